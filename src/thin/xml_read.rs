//! A streaming, strictly validating reader of thin_dump XML: the input of
//! thin_restore.
//!
//! The reader turns the document into [`MetadataVisitor`] events, in
//! document order, and checks everything a restore relies on: the grammar
//! (`<superblock>` holding `<def>`s and `<device>`s, those holding
//! mappings, devices also `<ref>`s), each attribute's presence and range,
//! and the metadata's consistency (unique device ids and def names, refs to
//! earlier defs, mappings in order and inside the pool). The first problem
//! ends the read with an [`XmlError`] naming its line and column.
//!
//! It reads in 1 MiB chunks and scans bytes by hand; a mapping element costs
//! no heap allocation, and positions are tracked by counting newlines as the
//! scanner passes them. Comments and whitespace are streamed, so only one
//! tag ever has to fit in the buffer.

use std::collections::HashSet;
use std::io::{self, Read};

use crate::thin::def_name::DefMap;
use crate::thin::dump::{DeviceInfo, Mapping, MetadataVisitor, SuperblockInfo};

/// Bytes asked of the input per read.
const CHUNK: usize = 1 << 20;
/// A single tag longer than this is refused (it would have to be buffered whole).
const MAX_TAG: usize = 16 << 20;
/// Device ids are 24 bits on disk.
const DEV_ID_LIMIT: u64 = 1 << 24;
/// Superblock and device times are 32 bits on disk.
const TIME_LIMIT: u64 = 1 << 32;
/// A mapping's block_time keeps 24 bits of time.
const MAPPING_TIME_LIMIT: u64 = 1 << 24;
/// A mapping's block_time keeps 40 bits of data block.
const DATA_BLOCK_LIMIT: u64 = 1 << 40;

/// What a successful read saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XmlStats {
    pub nr_devices: u64,
    pub nr_defs: u64,
    pub nr_refs: u64,
    /// sum of mapping lengths inside <device> elements (not counting refs)
    pub device_entries: u64,
    /// sum of mapping lengths inside <def> elements
    pub def_entries: u64,
    /// mapping entries a device reaches through its refs (sum over refs of the def's entries)
    pub ref_entries: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum XmlError {
    /// The document is malformed or describes invalid metadata.
    #[error("line {line}, column {col}: {msg}")]
    Parse { line: u64, col: u64, msg: String },
    /// Reading the input failed.
    #[error("{0}")]
    Read(io::Error),
    /// The visitor returned an error for the element at this position.
    #[error("line {line}, column {col}: {source}")]
    Visitor {
        line: u64,
        col: u64,
        source: io::Error,
    },
}

/// Read thin_dump XML from `input`, validating it and feeding `visitor` the
/// events in document order. Does not call `visitor.finish()`.
///
/// Lines and columns in errors are 1-based; columns count bytes.
pub fn read_xml<R: Read, V: MetadataVisitor + ?Sized>(
    input: R,
    visitor: &mut V,
) -> Result<XmlStats, XmlError> {
    read_xml_with_pool_size(input, visitor, None)
}

/// [`read_xml`], with mappings checked against `nr_data_blocks` instead of
/// the document's value (thin_restore --nr-data-blocks; needed for the
/// peer's `thin_dump -m` output, which says `nr_data_blocks="0"`).
pub fn read_xml_with_pool_size<R: Read, V: MetadataVisitor + ?Sized>(
    input: R,
    visitor: &mut V,
    nr_data_blocks: Option<u64>,
) -> Result<XmlStats, XmlError> {
    let mut p = Parser {
        pool_size_override: nr_data_blocks,
        input,
        visitor,
        buf: vec![0; CHUNK],
        pos: 0,
        end: 0,
        base: 0,
        eof: false,
        line: 1,
        line_start: 0,
        bom: 0,
        ctx: Ctx::Prolog,
        nr_data_blocks: 0,
        run: Run::default(),
        def_name: String::new(),
        defs: DefMap::default(),
        dev_ids: HashSet::new(),
        text: String::new(),
        stats: XmlStats::default(),
    };
    p.run()?;
    Ok(p.stats)
}

//------------------------------------------------------------------------------
// Elements and their attributes

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Superblock,
    Def,
    Device,
    Range,
    Single,
    Ref,
}

const MAX_ATTRS: usize = 8;

const SB_ATTRS: &[&str] = &[
    "uuid",
    "time",
    "transaction",
    "flags",
    "version",
    "data_block_size",
    "nr_data_blocks",
    "metadata_snap",
];
const SB_UUID: usize = 0;
const SB_TIME: usize = 1;
const SB_TRANSACTION: usize = 2;
const SB_FLAGS: usize = 3;
const SB_VERSION: usize = 4;
const SB_DATA_BLOCK_SIZE: usize = 5;
const SB_NR_DATA_BLOCKS: usize = 6;
const SB_METADATA_SNAP: usize = 7;
const DEVICE_ATTRS: &[&str] = &[
    "dev_id",
    "mapped_blocks",
    "transaction",
    "creation_time",
    "snap_time",
];
const RANGE_ATTRS: &[&str] = &["origin_begin", "data_begin", "length", "time"];
const SINGLE_ATTRS: &[&str] = &["origin_block", "data_block", "time"];
const NAME_ATTRS: &[&str] = &["name"];

/// Byte-string equality, inlined (short strings: cheaper than a call).
#[inline(always)]
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x == y)
}

impl Kind {
    #[inline]
    fn from_name(n: &[u8]) -> Option<Kind> {
        // By length first: names are compared inline (no memcmp calls on
        // the hot path of hundreds of millions of mapping lines).
        let (kind, want): (Kind, &[u8]) = match n.len() {
            13 => (Kind::Range, b"range_mapping"),
            14 => (Kind::Single, b"single_mapping"),
            3 if n[2] == b'f' && n[1] == b'e' && n[0] == b'r' => return Some(Kind::Ref),
            3 => (Kind::Def, b"def"),
            6 => (Kind::Device, b"device"),
            10 => (Kind::Superblock, b"superblock"),
            _ => return None,
        };
        same(n, want).then_some(kind)
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Superblock => "superblock",
            Kind::Def => "def",
            Kind::Device => "device",
            Kind::Range => "range_mapping",
            Kind::Single => "single_mapping",
            Kind::Ref => "ref",
        }
    }

    /// Attribute names, in the order the writer prints them.
    #[inline]
    fn attrs(self) -> &'static [&'static str] {
        match self {
            Kind::Superblock => SB_ATTRS,
            Kind::Def | Kind::Ref => NAME_ATTRS,
            Kind::Device => DEVICE_ATTRS,
            Kind::Range => RANGE_ATTRS,
            Kind::Single => SINGLE_ATTRS,
        }
    }

    /// Bit mask of the required attributes.
    #[inline]
    fn required(self) -> u32 {
        match self {
            Kind::Superblock => {
                1 << SB_UUID
                    | 1 << SB_TIME
                    | 1 << SB_TRANSACTION
                    | 1 << SB_DATA_BLOCK_SIZE
                    | 1 << SB_NR_DATA_BLOCKS
            }
            k => (1 << k.attrs().len()) - 1,
        }
    }

    /// Whether attribute `idx` holds a string (decoded into the parser's text) rather than a number.
    #[inline]
    fn is_string_attr(self, idx: usize) -> bool {
        idx == 0 && matches!(self, Kind::Superblock | Kind::Def | Kind::Ref)
    }
}

/// A start tag (or empty-element tag), its attributes parsed into slots.
#[derive(Debug, PartialEq, Eq)]
struct Tag {
    kind: Kind,
    /// Numeric attribute values, by index in `kind.attrs()`.
    vals: [u64; MAX_ATTRS],
    /// Bit i: attribute i was given.
    seen: u32,
    /// `<x/>`
    empty: bool,
    /// Bytes from `<` to `>` inclusive.
    len: usize,
    /// Newlines inside the tag, and the offset of the last one.
    newlines: u64,
    last_nl: usize,
}

impl Tag {
    fn missing(&self) -> Option<&'static str> {
        let lacking = self.kind.required() & !self.seen;
        (lacking != 0).then(|| self.kind.attrs()[lacking.trailing_zeros() as usize])
    }
}

/// A syntax problem inside a tag: offset from its `<` (0: the element itself) and message.
type TagError = (usize, String);

#[inline(always)]
fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// Up to 40 bytes of `b`, for messages.
/// Up to 40 bytes of input for a message: control characters (NULs and
/// the like from binary input) escaped, so the message stays one printable
/// line.
fn lossy(b: &[u8]) -> String {
    let cut = b.len().min(40);
    let mut s = String::new();
    for c in String::from_utf8_lossy(&b[..cut]).chars() {
        if c.is_control() {
            s.extend(c.escape_default());
        } else {
            s.push(c);
        }
    }
    if cut < b.len() {
        s.push_str("...");
    }
    s
}

fn show_byte(b: u8) -> String {
    if b.is_ascii_graphic() {
        format!("'{}'", b as char)
    } else {
        format!("byte 0x{b:02x}")
    }
}

/// A mapping exactly as thin_dump writes it (`<range_mapping
/// origin_begin="N" data_begin="N" length="N" time="N"/>`, and
/// single_mapping's three), nearly every tag of a big dump, read without
/// the general loop. Anything else (other spacing, order or quotes, an
/// entity, a number of 20 digits, the end of the buffer) gives `None` and
/// takes the general path, which reads the writer's form to the same tag.
#[inline]
fn parse_written_mapping(s: &[u8]) -> Option<Tag> {
    // The separators are compared as arrays of known length, which compile
    // to a few loads (a slice compare of run-time length calls memcmp).
    const RANGE: &[u8; 29] = b"<range_mapping origin_begin=\"";
    const SINGLE: &[u8; 30] = b"<single_mapping origin_block=\"";
    let (kind, mut i) = match s.get(1) {
        Some(b'r') if lit(s, 0, RANGE) => (Kind::Range, RANGE.len()),
        Some(b's') if lit(s, 0, SINGLE) => (Kind::Single, SINGLE.len()),
        _ => return None,
    };
    let mut t = Tag {
        kind,
        vals: [0; MAX_ATTRS],
        seen: kind.required(), // all of a mapping's attributes are given
        empty: true,
        len: 0,
        newlines: 0,
        last_nl: 0,
    };
    if kind == Kind::Range {
        t.vals[0] = digits(s, &mut i)?;
        sep(s, &mut i, b"\" data_begin=\"")?;
        t.vals[1] = digits(s, &mut i)?;
        sep(s, &mut i, b"\" length=\"")?;
        t.vals[2] = digits(s, &mut i)?;
        sep(s, &mut i, b"\" time=\"")?;
        t.vals[3] = digits(s, &mut i)?;
    } else {
        t.vals[0] = digits(s, &mut i)?;
        sep(s, &mut i, b"\" data_block=\"")?;
        t.vals[1] = digits(s, &mut i)?;
        sep(s, &mut i, b"\" time=\"")?;
        t.vals[2] = digits(s, &mut i)?;
    }
    sep(s, &mut i, b"\"/>")?;
    t.len = i;
    Some(t)
}

/// Whether `s[at..]` starts with `lit`.
#[inline(always)]
fn lit<const N: usize>(s: &[u8], at: usize, lit: &[u8; N]) -> bool {
    s.get(at..at + N).is_some_and(|b| b == lit)
}

/// Step over `lit` at `s[*i..]`.
#[inline(always)]
fn sep<const N: usize>(s: &[u8], i: &mut usize, l: &[u8; N]) -> Option<()> {
    lit(s, *i, l).then(|| *i += N)
}

/// The decimal number at `s[*i..]` (1 to 19 digits), stepped over.
#[inline(always)]
fn digits(s: &[u8], i: &mut usize) -> Option<u64> {
    let v0 = *i;
    let mut v = 0u64;
    while let Some(d) = s.get(*i).map(|c| c.wrapping_sub(b'0')).filter(|&d| d < 10) {
        if *i - v0 == 19 {
            return None; // 20 digits may not fit: the general path says so
        }
        v = v * 10 + d as u64;
        *i += 1;
    }
    (*i > v0).then_some(v)
}

/// Parse the start tag at the beginning of `s` (`s[0] == b'<'`). `Ok(None)`:
/// `s` ends before the tag does. String attributes are decoded into `text`.
#[inline]
fn parse_start_tag(s: &[u8], text: &mut String) -> Result<Option<Tag>, TagError> {
    match parse_written_mapping(s) {
        Some(t) => Ok(Some(t)),
        None => parse_any_start_tag(s, text),
    }
}

/// [`parse_start_tag`] for any form of tag.
fn parse_any_start_tag(s: &[u8], text: &mut String) -> Result<Option<Tag>, TagError> {
    let n = s.len();
    let mut i = 1;
    while i < n && !is_ws(s[i]) && s[i] != b'>' && s[i] != b'/' {
        i += 1;
    }
    if i >= n {
        return Ok(None);
    }
    let kind = match Kind::from_name(&s[1..i]) {
        Some(k) => k,
        None if i == 1 => return Err((1, "expected an element name after '<'".into())),
        None => return Err((0, format!("unknown element <{}>", lossy(&s[1..i])))),
    };
    let names = kind.attrs();
    let mut t = Tag {
        kind,
        vals: [0; MAX_ATTRS],
        seen: 0,
        empty: false,
        len: 0,
        newlines: 0,
        last_nl: 0,
    };
    loop {
        let ws0 = i;
        while i < n && is_ws(s[i]) {
            if s[i] == b'\n' {
                t.newlines += 1;
                t.last_nl = i;
            }
            i += 1;
        }
        if i >= n {
            return Ok(None);
        }
        match s[i] {
            b'>' => {
                t.len = i + 1;
                return Ok(Some(t));
            }
            b'/' => {
                if i + 1 >= n {
                    return Ok(None);
                }
                if s[i + 1] != b'>' {
                    return Err((
                        i + 1,
                        format!("expected '>' after '/' in <{}>", kind.name()),
                    ));
                }
                t.empty = true;
                t.len = i + 2;
                return Ok(Some(t));
            }
            c if i == ws0 => {
                return Err((
                    i,
                    format!("unexpected {} in <{}>", show_byte(c), kind.name()),
                ))
            }
            _ => {}
        }

        // Attribute name.
        let a0 = i;
        while i < n && !is_ws(s[i]) && !matches!(s[i], b'=' | b'>' | b'/' | b'"' | b'\'' | b'<') {
            i += 1;
        }
        if i >= n {
            return Ok(None);
        }
        if i == a0 {
            return Err((
                i,
                format!("unexpected {} in <{}>", show_byte(s[i]), kind.name()),
            ));
        }
        let aname = &s[a0..i];
        // Attributes nearly always come in the writer's order: try the next
        // one first.
        let next = t.seen.count_ones() as usize;
        let guess = names
            .get(next)
            .filter(|a| same(a.as_bytes(), aname))
            .map(|_| next);
        let idx = match guess.or_else(|| names.iter().position(|a| same(a.as_bytes(), aname))) {
            Some(x) => x,
            None => {
                return Err((
                    0,
                    format!(
                        "unknown attribute \"{}\" in <{}>",
                        lossy(aname),
                        kind.name()
                    ),
                ))
            }
        };
        if t.seen & (1 << idx) != 0 {
            return Err((
                0,
                format!(
                    "duplicate attribute \"{}\" in <{}>",
                    names[idx],
                    kind.name()
                ),
            ));
        }
        t.seen |= 1 << idx;

        // '=' and the opening quote, whitespace allowed around '='.
        while i < n && is_ws(s[i]) {
            if s[i] == b'\n' {
                t.newlines += 1;
                t.last_nl = i;
            }
            i += 1;
        }
        if i >= n {
            return Ok(None);
        }
        if s[i] != b'=' {
            return Err((
                i,
                format!("expected '=' after attribute \"{}\"", names[idx]),
            ));
        }
        i += 1;
        while i < n && is_ws(s[i]) {
            if s[i] == b'\n' {
                t.newlines += 1;
                t.last_nl = i;
            }
            i += 1;
        }
        if i >= n {
            return Ok(None);
        }
        let q = s[i];
        if q != b'"' && q != b'\'' {
            return Err((
                i,
                format!("expected a quoted value for attribute \"{}\"", names[idx]),
            ));
        }
        i += 1;

        // The value; plain decimal digits are converted on the way.
        let v0 = i;
        let mut v: u64 = 0;
        let mut plain = true;
        loop {
            if i >= n {
                return Ok(None);
            }
            let c = s[i];
            if c == q {
                break;
            }
            let d = c.wrapping_sub(b'0');
            if d < 10 {
                v = v.wrapping_mul(10).wrapping_add(d as u64);
            } else {
                plain = false;
                match c {
                    b'<' => return Err((i, "'<' is not allowed in an attribute value".into())),
                    b'\n' => {
                        t.newlines += 1;
                        t.last_nl = i;
                    }
                    _ => {}
                }
            }
            i += 1;
        }
        let raw = &s[v0..i];
        i += 1;
        if kind.is_string_attr(idx) {
            let mut bytes = std::mem::take(text).into_bytes();
            bytes.clear();
            decode_value(raw, &mut bytes).map_err(|(off, m)| (v0 + off, m))?;
            match String::from_utf8(bytes) {
                Ok(st) => *text = st,
                Err(_) => {
                    return Err((
                        v0,
                        format!("attribute \"{}\" is not valid UTF-8", names[idx]),
                    ))
                }
            }
        } else if plain && !raw.is_empty() && raw.len() <= 19 {
            t.vals[idx] = v;
        } else {
            t.vals[idx] = parse_number(raw, kind, names[idx]).map_err(|(off, m)| {
                // Decoding errors point into the value; bad numbers at the element.
                (if off == usize::MAX { 0 } else { v0 + off }, m)
            })?;
        }
    }
}

/// The slow path of a numeric attribute: references decoded, then digits
/// checked. Errors with offset `usize::MAX` concern the number itself.
#[cold]
fn parse_number(raw: &[u8], kind: Kind, attr: &str) -> Result<u64, TagError> {
    let mut bytes = Vec::new();
    decode_value(raw, &mut bytes)?;
    let bad = |what: &str| {
        (
            usize::MAX,
            format!(
                "attribute \"{attr}\" in <{}> is {what}: \"{}\"",
                kind.name(),
                lossy(&bytes)
            ),
        )
    };
    if bytes.is_empty() || !bytes.iter().all(u8::is_ascii_digit) {
        return Err(bad("not a number"));
    }
    let mut v: u64 = 0;
    for &c in &bytes {
        v = match v
            .checked_mul(10)
            .and_then(|v| v.checked_add((c - b'0') as u64))
        {
            Some(v) => v,
            None => return Err(bad("too large")),
        };
    }
    Ok(v)
}

/// Decode an attribute value: the five entities, character references, and
/// XML's normalisation of literal tabs and line ends to spaces.
fn decode_value(raw: &[u8], out: &mut Vec<u8>) -> Result<(), TagError> {
    let mut i = 0;
    while i < raw.len() {
        let c = raw[i];
        match c {
            b'&' => {
                let semi = match raw[i..].iter().position(|&b| b == b';') {
                    Some(k) => i + k,
                    None => return Err((i, "unterminated entity reference".into())),
                };
                let ent = &raw[i + 1..semi];
                match ent {
                    b"lt" => out.push(b'<'),
                    b"gt" => out.push(b'>'),
                    b"amp" => out.push(b'&'),
                    b"quot" => out.push(b'"'),
                    b"apos" => out.push(b'\''),
                    [b'#', num @ ..] => {
                        let (digits, radix) = match num {
                            [b'x', hex @ ..] => (hex, 16),
                            dec => (dec, 10),
                        };
                        let ch = std::str::from_utf8(digits)
                            .ok()
                            .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_hexdigit()))
                            .and_then(|d| u32::from_str_radix(d, radix).ok())
                            .and_then(char::from_u32)
                            .filter(|&ch| {
                                matches!(ch, '\t' | '\n' | '\r')
                                    || (ch >= ' ' && ch != '\u{fffe}' && ch != '\u{ffff}')
                            });
                        match ch {
                            Some(ch) => {
                                let mut b = [0u8; 4];
                                out.extend_from_slice(ch.encode_utf8(&mut b).as_bytes());
                            }
                            None => {
                                return Err((
                                    i,
                                    format!("invalid character reference &{};", lossy(ent)),
                                ))
                            }
                        }
                    }
                    _ => return Err((i, format!("unknown entity &{};", lossy(ent)))),
                }
                i = semi + 1;
                continue;
            }
            b'<' => return Err((i, "'<' is not allowed in an attribute value".into())),
            b'\r' => {
                out.push(b' ');
                if raw.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b'\n' | b'\t' => out.push(b' '),
            c if c < 0x20 => {
                return Err((
                    i,
                    format!("control character 0x{c:02x} in an attribute value"),
                ))
            }
            c => out.push(c),
        }
        i += 1;
    }
    Ok(())
}

//------------------------------------------------------------------------------
// The parser

/// Where in the document the scanner is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctx {
    /// Before the root element.
    Prolog,
    Superblock,
    Def,
    Device,
    /// Inside a non-empty `<range_mapping>`, `<single_mapping>` or `<ref>`;
    /// true when that sits in a def.
    Leaf(Kind, bool),
    /// After the root element.
    Epilog,
}

/// Ordering state of the def or device being read.
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    /// Whether it covers any origin yet.
    any: bool,
    first: u64,
    prev_begin: u64,
    prev_end: u64,
    entries: u64,
}

/// What a ref to a def covers.
#[derive(Debug, Clone, Copy)]
struct DefInfo {
    /// How many defs began before this one.
    nth: u32,
    any: bool,
    first: u64,
    end: u64,
    entries: u64,
}

struct Parser<'v, R, V: ?Sized> {
    input: R,
    visitor: &'v mut V,
    buf: Vec<u8>,
    /// Next byte to scan, and end of the valid bytes, in `buf`.
    pos: usize,
    end: usize,
    /// Input offset of `buf[0]`.
    base: u64,
    eof: bool,
    /// Line of `pos`, and input offset of that line's first byte.
    line: u64,
    line_start: u64,
    /// Length of a leading byte-order mark.
    bom: u64,
    ctx: Ctx,
    nr_data_blocks: u64,
    pool_size_override: Option<u64>,
    run: Run,
    def_name: String,
    defs: DefMap<DefInfo>,
    dev_ids: HashSet<u64>,
    /// The decoded string attribute of the last tag.
    text: String,
    stats: XmlStats,
}

impl<R: Read, V: MetadataVisitor + ?Sized> Parser<'_, R, V> {
    /// Keep the unscanned bytes, read more after them. False at end of input.
    fn refill(&mut self) -> Result<bool, XmlError> {
        if self.eof {
            return Ok(false);
        }
        if self.pos > 0 {
            self.buf.copy_within(self.pos..self.end, 0);
            self.base += self.pos as u64;
            self.end -= self.pos;
            self.pos = 0;
        }
        if self.buf.len() - self.end < CHUNK / 2 {
            self.buf.resize(self.end + CHUNK, 0);
        }
        loop {
            match self.input.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(false);
                }
                Ok(n) => {
                    self.end += n;
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(XmlError::Read(e)),
            }
        }
    }

    /// Read until `n` bytes are unscanned, or the input ends.
    fn ensure(&mut self, n: usize) -> Result<(), XmlError> {
        while self.end - self.pos < n && self.refill()? {}
        Ok(())
    }

    /// Line and column of input offset `at`, which must lie in `buf` at or after `pos`.
    fn position(&self, at: u64) -> (u64, u64) {
        let to = (at - self.base) as usize;
        let mut line = self.line;
        let mut line_start = self.line_start;
        for i in self.pos..to {
            if self.buf[i] == b'\n' {
                line += 1;
                line_start = self.base + i as u64 + 1;
            }
        }
        (line, at - line_start + 1)
    }

    fn error_at(&self, at: u64, msg: String) -> XmlError {
        let (line, col) = self.position(at);
        XmlError::Parse { line, col, msg }
    }

    /// An error at `off` bytes after `pos`.
    fn error_here(&self, off: usize, msg: String) -> XmlError {
        self.error_at(self.base + (self.pos + off) as u64, msg)
    }

    /// The end of input came too soon; `inside` says in what.
    fn eof_error(&self, inside: Option<&str>) -> XmlError {
        let mut msg = String::from("unexpected end of input");
        if let Some(what) = inside {
            msg.push_str(" inside ");
            msg.push_str(what);
        }
        match self.ctx {
            Ctx::Prolog => msg.push_str(" (no <superblock> element)"),
            Ctx::Epilog => {}
            c => {
                msg.push_str(" (unclosed <");
                msg.push_str(ctx_name(c));
                msg.push_str(">)");
            }
        }
        self.error_at(self.base + self.end as u64, msg)
    }

    fn run(&mut self) -> Result<(), XmlError> {
        self.ensure(3)?;
        if self.buf[self.pos..self.end].starts_with(b"\xef\xbb\xbf") {
            self.pos += 3;
            self.bom = 3;
            // Columns count bytes, but not those of the byte-order mark.
            self.line_start = 3;
        }
        loop {
            // Whitespace between elements.
            while self.pos < self.end {
                match self.buf[self.pos] {
                    b'<' => break,
                    b'\n' => {
                        self.line += 1;
                        self.line_start = self.base + self.pos as u64 + 1;
                    }
                    b' ' | b'\t' | b'\r' => {}
                    _ => return Err(self.text_error()),
                }
                self.pos += 1;
            }
            if self.pos == self.end {
                if !self.refill()? {
                    return match self.ctx {
                        Ctx::Epilog => Ok(()),
                        _ => Err(self.eof_error(None)),
                    };
                }
                continue;
            }
            if !self.markup()? {
                let len = self.end - self.pos;
                if !self.refill()? {
                    return Err(self.eof_error(Some("a tag")));
                }
                if len > MAX_TAG {
                    return Err(self.error_here(0, "tag longer than 16 MiB".into()));
                }
            }
        }
    }

    #[cold]
    fn text_error(&mut self) -> XmlError {
        let (line, col) = self.position(self.base + self.pos as u64);
        if let Err(e) = self.ensure(24) {
            return e;
        }
        let s = &self.buf[self.pos..self.end];
        let cut = s
            .iter()
            .take(24)
            .position(|&b| b == b'<' || b == b'\n' || b == b'\r')
            .unwrap_or(s.len().min(24));
        let where_ = if self.ctx == Ctx::Epilog {
            " after the root element"
        } else {
            ""
        };
        XmlError::Parse {
            line,
            col,
            msg: format!("unexpected text \"{}\"{where_}", lossy(&s[..cut])),
        }
    }

    /// The markup at `pos` (a `<`). False: more input is needed to finish it.
    #[inline]
    fn markup(&mut self) -> Result<bool, XmlError> {
        let s = &self.buf[self.pos..self.end];
        if s.len() < 2 {
            return Ok(false);
        }
        match s[1] {
            b'/' => self.end_tag(),
            b'!' => {
                if s.len() < 4 {
                    return Ok(false);
                }
                if &s[..4] != b"<!--" {
                    return Err(self.error_here(
                        0,
                        "unsupported markup (only elements and comments are allowed)".into(),
                    ));
                }
                self.pos += 4;
                self.skip_past(b"-->", "a comment")?;
                Ok(true)
            }
            b'?' => {
                if s.len() < 6 {
                    return Ok(false);
                }
                if &s[..5] != b"<?xml" || !(is_ws(s[5]) || s[5] == b'?') {
                    return Err(self.error_here(0, "unexpected processing instruction".into()));
                }
                if self.base + self.pos as u64 != self.bom {
                    return Err(self.error_here(
                        0,
                        "the XML declaration must be at the start of the input".into(),
                    ));
                }
                self.pos += 5;
                self.skip_past(b"?>", "the XML declaration")?;
                Ok(true)
            }
            _ => self.start_tag(),
        }
    }

    /// Stream past the next `term` (which holds no newline).
    fn skip_past(&mut self, term: &[u8], what: &str) -> Result<(), XmlError> {
        let t = term.len();
        loop {
            let mut i = self.pos;
            while i + t <= self.end {
                let b = self.buf[i];
                if b == term[0] && &self.buf[i..i + t] == term {
                    self.pos = i + t;
                    return Ok(());
                }
                if b == b'\n' {
                    self.line += 1;
                    self.line_start = self.base + i as u64 + 1;
                }
                i += 1;
            }
            self.pos = i;
            if !self.refill()? {
                return Err(self.eof_error(Some(what)));
            }
        }
    }

    #[inline]
    fn start_tag(&mut self) -> Result<bool, XmlError> {
        let s = &self.buf[self.pos..self.end];
        let tag = match parse_start_tag(s, &mut self.text) {
            Ok(Some(t)) => t,
            Ok(None) => return Ok(false),
            Err((off, msg)) => return Err(self.error_here(off, msg)),
        };
        let at = self.base + self.pos as u64;
        let (line, col) = (self.line, at - self.line_start + 1);
        if tag.newlines > 0 {
            self.line += tag.newlines;
            self.line_start = at + tag.last_nl as u64 + 1;
        }
        self.pos += tag.len;
        self.element(&tag, line, col)?;
        Ok(true)
    }

    fn end_tag(&mut self) -> Result<bool, XmlError> {
        let s = &self.buf[self.pos..self.end];
        let n = s.len();
        let mut i = 2;
        while i < n && !is_ws(s[i]) && s[i] != b'>' && s[i] != b'<' {
            i += 1;
        }
        if i >= n {
            return Ok(false);
        }
        if i == 2 {
            return Err(self.error_here(2, "expected an element name after '</'".into()));
        }
        let name_end = i;
        let mut newlines = 0;
        let mut last_nl = 0;
        while i < n && is_ws(s[i]) {
            if s[i] == b'\n' {
                newlines += 1;
                last_nl = i;
            }
            i += 1;
        }
        if i >= n {
            return Ok(false);
        }
        if s[i] != b'>' {
            return Err(self.error_here(i, "expected '>' in a closing tag".into()));
        }
        let name = &s[2..name_end];
        let at = self.base + self.pos as u64;
        let (line, col) = (self.line, at - self.line_start + 1);
        let perr = |msg: String| XmlError::Parse { line, col, msg };
        let expected = match self.ctx {
            Ctx::Prolog | Ctx::Epilog => {
                return Err(perr(format!("unexpected closing tag </{}>", lossy(name))));
            }
            c => ctx_name(c),
        };
        if name != expected.as_bytes() {
            return Err(perr(format!(
                "mismatched closing tag </{}> (expected </{expected}>)",
                lossy(name)
            )));
        }
        if newlines > 0 {
            self.line += newlines;
            self.line_start = at + last_nl as u64 + 1;
        }
        self.pos += i + 1;
        let vis = |r: io::Result<()>| r.map_err(|source| XmlError::Visitor { line, col, source });
        match self.ctx {
            Ctx::Leaf(_, in_def) => {
                self.ctx = if in_def { Ctx::Def } else { Ctx::Device };
            }
            Ctx::Def => {
                self.end_def();
                vis(self.visitor.def_end())?;
            }
            Ctx::Device => {
                self.ctx = Ctx::Superblock;
                vis(self.visitor.device_end())?;
            }
            Ctx::Superblock => {
                self.ctx = Ctx::Epilog;
                vis(self.visitor.superblock_end())?;
            }
            Ctx::Prolog | Ctx::Epilog => unreachable!(),
        }
        Ok(true)
    }

    /// Act on a start tag that began at (`line`, `col`).
    #[inline]
    fn element(&mut self, t: &Tag, line: u64, col: u64) -> Result<(), XmlError> {
        match (self.ctx, t.kind) {
            (Ctx::Device | Ctx::Def, Kind::Range | Kind::Single) => self.mapping(t, line, col),
            (Ctx::Device, Kind::Ref) => self.reference(t, line, col),
            (Ctx::Superblock, Kind::Device) => self.device(t, line, col),
            (Ctx::Superblock, Kind::Def) => self.def(t, line, col),
            (Ctx::Prolog, Kind::Superblock) => self.superblock(t, line, col),
            (ctx, k) => {
                let msg = match ctx {
                    Ctx::Prolog => format!(
                        "expected <superblock> as the root element, found <{}>",
                        k.name()
                    ),
                    Ctx::Epilog => format!("unexpected <{}> after the root element", k.name()),
                    c => format!("unexpected <{}> inside <{}>", k.name(), ctx_name(c)),
                };
                Err(XmlError::Parse { line, col, msg })
            }
        }
    }

    fn superblock(&mut self, t: &Tag, line: u64, col: u64) -> Result<(), XmlError> {
        let perr = |msg: String| XmlError::Parse { line, col, msg };
        if let Some(a) = t.missing() {
            return Err(perr(format!("missing attribute \"{a}\" in <superblock>")));
        }
        let v = &t.vals;
        let given = |i: usize| t.seen & (1 << i) != 0;
        let time = v[SB_TIME];
        if time >= TIME_LIMIT {
            return Err(perr(format!(
                "superblock time {time} out of range (must be < 2^32)"
            )));
        }
        let flags = if given(SB_FLAGS) { v[SB_FLAGS] } else { 0 };
        if flags > 1 {
            return Err(perr(format!(
                "superblock flags {flags} not supported (must be 0 or 1)"
            )));
        }
        let version = if given(SB_VERSION) { v[SB_VERSION] } else { 2 };
        if !(1..=2).contains(&version) {
            return Err(perr(format!(
                "superblock version {version} not supported (must be 1 or 2)"
            )));
        }
        let dbs = v[SB_DATA_BLOCK_SIZE];
        if !(128..=2097152).contains(&dbs) || dbs % 128 != 0 {
            return Err(perr(format!(
                "data_block_size {dbs} invalid (must be a multiple of 128 from 128 to 2097152)"
            )));
        }
        self.nr_data_blocks = self.pool_size_override.unwrap_or(v[SB_NR_DATA_BLOCKS]);
        let sb = SuperblockInfo {
            uuid: self.text.clone(),
            time,
            transaction: v[SB_TRANSACTION],
            flags: flags as u32,
            version: version as u32,
            data_block_size: dbs as u32,
            nr_data_blocks: self.nr_data_blocks,
            metadata_snap: given(SB_METADATA_SNAP).then_some(v[SB_METADATA_SNAP]),
        };
        let vis = |r: io::Result<()>| r.map_err(|source| XmlError::Visitor { line, col, source });
        vis(self.visitor.superblock_begin(&sb))?;
        if t.empty {
            self.ctx = Ctx::Epilog;
            vis(self.visitor.superblock_end())?;
        } else {
            self.ctx = Ctx::Superblock;
        }
        Ok(())
    }

    fn def(&mut self, t: &Tag, line: u64, col: u64) -> Result<(), XmlError> {
        let perr = |msg: String| XmlError::Parse { line, col, msg };
        if t.missing().is_some() {
            return Err(perr("missing attribute \"name\" in <def>".into()));
        }
        if self.text.is_empty() {
            return Err(perr("empty name in <def>".into()));
        }
        if self.defs.contains_key(self.text.as_bytes()) {
            return Err(perr(format!("duplicate def name {:?}", self.text)));
        }
        self.def_name.clone_from(&self.text);
        self.run = Run::default();
        self.stats.nr_defs += 1;
        let vis = |r: io::Result<()>| r.map_err(|source| XmlError::Visitor { line, col, source });
        vis(self.visitor.def_begin(&self.def_name))?;
        if t.empty {
            self.end_def();
            vis(self.visitor.def_end())?;
        } else {
            self.ctx = Ctx::Def;
        }
        Ok(())
    }

    fn end_def(&mut self) {
        let r = self.run;
        let nth = self.defs.len() as u32;
        // def() refused a name already given.
        let _ = self.defs.insert(
            &self.def_name,
            DefInfo {
                nth,
                any: r.any,
                first: r.first,
                end: r.prev_end,
                entries: r.entries,
            },
        );
        self.ctx = Ctx::Superblock;
    }

    fn device(&mut self, t: &Tag, line: u64, col: u64) -> Result<(), XmlError> {
        let perr = |msg: String| XmlError::Parse { line, col, msg };
        if let Some(a) = t.missing() {
            return Err(perr(format!("missing attribute \"{a}\" in <device>")));
        }
        let v = &t.vals;
        let d = DeviceInfo {
            dev_id: v[0],
            mapped_blocks: v[1],
            transaction: v[2],
            creation_time: v[3],
            snap_time: v[4],
        };
        if d.dev_id >= DEV_ID_LIMIT {
            return Err(perr(format!(
                "dev_id {} out of range (must be < 2^24)",
                d.dev_id
            )));
        }
        if d.creation_time >= TIME_LIMIT {
            return Err(perr(format!(
                "creation_time {} out of range (must be < 2^32)",
                d.creation_time
            )));
        }
        if d.snap_time >= TIME_LIMIT {
            return Err(perr(format!(
                "snap_time {} out of range (must be < 2^32)",
                d.snap_time
            )));
        }
        if !self.dev_ids.insert(d.dev_id) {
            return Err(perr(format!("duplicate dev_id {}", d.dev_id)));
        }
        self.run = Run::default();
        self.stats.nr_devices += 1;
        let vis = |r: io::Result<()>| r.map_err(|source| XmlError::Visitor { line, col, source });
        vis(self.visitor.device_begin(&d))?;
        if t.empty {
            vis(self.visitor.device_end())?;
        } else {
            self.ctx = Ctx::Device;
        }
        Ok(())
    }

    #[inline]
    fn mapping(&mut self, t: &Tag, line: u64, col: u64) -> Result<(), XmlError> {
        let perr = |msg: String| XmlError::Parse { line, col, msg };
        if t.seen != t.kind.required() {
            let a = t.missing().unwrap_or("?");
            return Err(perr(format!(
                "missing attribute \"{a}\" in <{}>",
                t.kind.name()
            )));
        }
        let v = &t.vals;
        let (origin, data, len, time) = match t.kind {
            Kind::Range => (v[0], v[1], v[2], v[3]),
            _ => (v[0], v[1], 1, v[2]),
        };
        if len == 0 {
            return Err(perr(
                "length 0 in <range_mapping> (must be at least 1)".into(),
            ));
        }
        if time >= MAPPING_TIME_LIMIT {
            return Err(perr(format!(
                "mapping time {time} out of range (must be < 2^24)"
            )));
        }
        let Some(origin_end) = origin.checked_add(len) else {
            return Err(perr(format!(
                "mapping at origin {origin} with length {len} overflows the origin range"
            )));
        };
        let last = match data.checked_add(len - 1) {
            Some(last) if last < DATA_BLOCK_LIMIT => last,
            Some(last) => return Err(perr(format!("data block {last} beyond the 40-bit limit"))),
            None => {
                return Err(perr(format!(
                    "data blocks from {data} with length {len} beyond the 40-bit limit"
                )))
            }
        };
        if last >= self.nr_data_blocks {
            return Err(perr(format!(
                "data block {last} beyond nr_data_blocks {}",
                self.nr_data_blocks
            )));
        }
        let run = &mut self.run;
        if run.any && origin < run.prev_end {
            return Err(perr(if origin < run.prev_begin {
                format!(
                    "mapping at origin {origin} is out of order (the previous one begins at {})",
                    run.prev_begin
                )
            } else {
                format!(
                    "mapping at origin {origin} overlaps the previous one (ends at {})",
                    run.prev_end
                )
            }));
        }
        if !run.any {
            run.any = true;
            run.first = origin;
        }
        run.prev_begin = origin;
        run.prev_end = origin_end;
        run.entries += len;
        let in_def = self.ctx == Ctx::Def;
        if in_def {
            self.stats.def_entries = self.stats.def_entries.saturating_add(len);
        } else {
            self.stats.device_entries = self.stats.device_entries.saturating_add(len);
        }
        if !t.empty {
            self.ctx = Ctx::Leaf(t.kind, in_def);
        }
        let m = Mapping {
            origin_begin: origin,
            data_begin: data,
            len,
            time: time as u32,
        };
        self.visitor
            .mapping(&m)
            .map_err(|source| XmlError::Visitor { line, col, source })
    }

    fn reference(&mut self, t: &Tag, line: u64, col: u64) -> Result<(), XmlError> {
        let perr = |msg: String| XmlError::Parse { line, col, msg };
        if t.missing().is_some() {
            return Err(perr("missing attribute \"name\" in <ref>".into()));
        }
        let name = self.text.as_str();
        if name.is_empty() {
            return Err(perr("empty name in <ref>".into()));
        }
        let Some(d) = self.defs.get(name.as_bytes()) else {
            return Err(perr(format!("ref to undefined def {name:?}")));
        };
        let run = &mut self.run;
        if d.any {
            if run.any && d.first < run.prev_end {
                return Err(perr(if d.first < run.prev_begin {
                    format!(
                        "ref to def {name:?} at origin {} is out of order (the previous mapping begins at {})",
                        d.first, run.prev_begin
                    )
                } else {
                    format!(
                        "ref to def {name:?} at origin {} overlaps the previous mapping (ends at {})",
                        d.first, run.prev_end
                    )
                }));
            }
            if !run.any {
                run.any = true;
                run.first = d.first;
            }
            run.prev_begin = d.first;
            run.prev_end = d.end;
        }
        self.stats.nr_refs += 1;
        self.stats.ref_entries = self.stats.ref_entries.saturating_add(d.entries);
        if !t.empty {
            self.ctx = Ctx::Leaf(Kind::Ref, false);
        }
        self.visitor
            .reference_nth(name, d.nth)
            .map_err(|source| XmlError::Visitor { line, col, source })
    }
}

/// The element a context is inside.
fn ctx_name(c: Ctx) -> &'static str {
    match c {
        Ctx::Superblock => "superblock",
        Ctx::Def => "def",
        Ctx::Device => "device",
        Ctx::Leaf(k, _) => k.name(),
        Ctx::Prolog | Ctx::Epilog => "",
    }
}

#[cfg(test)]
mod tests {
    /// The fast path for the writer's mappings reads exactly what the
    /// general parser reads, and leaves everything else to it: other
    /// spacing, quotes, numbers too long for it, a buffer cut mid-tag.
    #[test]
    fn written_mappings_parse_as_the_general_parser_parses_them() {
        use super::{parse_any_start_tag, parse_written_mapping};
        let fast = [
            r#"<range_mapping origin_begin="0" data_begin="8494483" length="4" time="0"/>"#,
            r#"<range_mapping origin_begin="18446744073709551" data_begin="9999999999999999999" length="1" time="4294967295"/>  "#,
            r#"<single_mapping origin_block="7" data_block="0012" time="3"/>
    <single"#,
        ];
        let general = [
            r#"<range_mapping origin_begin="0" data_begin="12345678901234567890" length="4" time="0"/>"#,
            r#"<range_mapping origin_begin="0" data_begin="" length="4" time="0"/>"#,
            r#"<range_mapping origin_begin='0' data_begin="1" length="4" time="0"/>"#,
            r#"<range_mapping  origin_begin="0" data_begin="1" length="4" time="0"/>"#,
            r#"<range_mapping origin_begin="0" length="4" data_begin="1" time="0"/>"#,
            r#"<range_mapping origin_begin="0" data_begin="1" length="4" time="0" />"#,
            r#"<range_mapping origin_begin="0" data_begin="&#49;" length="4" time="0"/>"#,
            r#"<range_mapping origin_begin="0" data_begin="1" length="4" time="0"></range_mapping>"#,
            r#"<single_mapping origin_block="-1" data_block="1" time="0"/>"#,
        ];
        let mut text = String::new();
        for s in fast {
            let t = parse_written_mapping(s.as_bytes()).expect(s);
            assert_eq!(
                Ok(Some(t)),
                parse_any_start_tag(s.as_bytes(), &mut text),
                "{s}"
            );
            // Cut anywhere inside the tag: both wait for more input.
            let whole = s.find("/>").unwrap() + 2;
            for cut in 1..whole {
                let part = &s.as_bytes()[..cut];
                assert_eq!(parse_written_mapping(part), None, "{s} cut at {cut}");
                assert_eq!(
                    parse_any_start_tag(part, &mut text),
                    Ok(None),
                    "{s} cut at {cut}"
                );
            }
        }
        for s in general {
            assert_eq!(parse_written_mapping(s.as_bytes()), None, "{s}");
        }
    }

    use super::*;
    use crate::thin::dump::XmlWriter;
    use std::path::Path;

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Ev {
        SbBegin(SuperblockInfo),
        SbEnd,
        DefBegin(String),
        DefEnd,
        DevBegin(DeviceInfo),
        DevEnd,
        Map(Mapping),
        Ref(String),
        Finish,
    }

    #[derive(Default)]
    struct Recorder(Vec<Ev>);

    impl MetadataVisitor for Recorder {
        fn superblock_begin(&mut self, sb: &SuperblockInfo) -> io::Result<()> {
            self.0.push(Ev::SbBegin(sb.clone()));
            Ok(())
        }
        fn superblock_end(&mut self) -> io::Result<()> {
            self.0.push(Ev::SbEnd);
            Ok(())
        }
        fn def_begin(&mut self, name: &str) -> io::Result<()> {
            self.0.push(Ev::DefBegin(name.to_string()));
            Ok(())
        }
        fn def_end(&mut self) -> io::Result<()> {
            self.0.push(Ev::DefEnd);
            Ok(())
        }
        fn device_begin(&mut self, d: &DeviceInfo) -> io::Result<()> {
            self.0.push(Ev::DevBegin(*d));
            Ok(())
        }
        fn device_end(&mut self) -> io::Result<()> {
            self.0.push(Ev::DevEnd);
            Ok(())
        }
        fn mapping(&mut self, m: &Mapping) -> io::Result<()> {
            self.0.push(Ev::Map(*m));
            Ok(())
        }
        fn reference(&mut self, name: &str) -> io::Result<()> {
            self.0.push(Ev::Ref(name.to_string()));
            Ok(())
        }
        fn finish(&mut self) -> io::Result<()> {
            self.0.push(Ev::Finish);
            Ok(())
        }
    }

    fn replay(evs: &[Ev], v: &mut dyn MetadataVisitor) {
        for e in evs {
            match e {
                Ev::SbBegin(sb) => v.superblock_begin(sb),
                Ev::SbEnd => v.superblock_end(),
                Ev::DefBegin(n) => v.def_begin(n),
                Ev::DefEnd => v.def_end(),
                Ev::DevBegin(d) => v.device_begin(d),
                Ev::DevEnd => v.device_end(),
                Ev::Map(m) => v.mapping(m),
                Ev::Ref(n) => v.reference(n),
                Ev::Finish => v.finish(),
            }
            .unwrap();
        }
    }

    fn to_xml(evs: &[Ev]) -> Vec<u8> {
        let mut w = XmlWriter::new(Vec::new());
        replay(evs, &mut w);
        w.into_inner()
    }

    /// Events and stats, or the error's text.
    fn read(input: impl Read) -> Result<(Vec<Ev>, XmlStats), String> {
        let mut r = Recorder::default();
        read_xml(input, &mut r)
            .map(|s| (r.0, s))
            .map_err(|e| e.to_string())
    }

    fn err(xml: &str) -> String {
        match read(xml.as_bytes()) {
            Ok(_) => panic!("accepted: {xml}"),
            Err(e) => e,
        }
    }

    /// Hands out 1 to 7 bytes per read.
    struct Trickle<'a> {
        data: &'a [u8],
        n: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.n += 1;
            let k = (self.n % 7 + 1).min(buf.len()).min(self.data.len());
            buf[..k].copy_from_slice(&self.data[..k]);
            self.data = &self.data[k..];
            Ok(k)
        }
    }

    fn sb(uuid: &str, flags: u32, version: u32, nr_data_blocks: u64) -> SuperblockInfo {
        SuperblockInfo {
            uuid: uuid.to_string(),
            time: 4_000_000_000,
            transaction: u64::MAX,
            flags,
            version,
            data_block_size: 2097152,
            nr_data_blocks,
            metadata_snap: None,
        }
    }

    fn dev(dev_id: u64) -> DeviceInfo {
        DeviceInfo {
            dev_id,
            mapped_blocks: 7,
            transaction: 3,
            creation_time: 1,
            snap_time: u32::MAX as u64,
        }
    }

    fn map(origin_begin: u64, data_begin: u64, len: u64, time: u32) -> Mapping {
        Mapping {
            origin_begin,
            data_begin,
            len,
            time,
        }
    }

    fn sample() -> Vec<Ev> {
        vec![
            Ev::SbBegin(sb("a<b>&\"c'd é", 1, 1, 1 << 40)),
            Ev::DefBegin("17".into()),
            Ev::Map(map(0, 0, 64, 0)),
            Ev::Map(map(64, 100, 1, 16_777_215)),
            Ev::DefEnd,
            Ev::DefBegin("empty".into()),
            Ev::DefEnd,
            Ev::DefBegin("<&>".into()),
            Ev::Map(map(1000, 5000, 10, 2)),
            Ev::DefEnd,
            Ev::DevBegin(dev(1)),
            Ev::Ref("17".into()),
            Ev::Ref("empty".into()),
            Ev::Map(map(70, 5, 1, 1)),
            Ev::Ref("<&>".into()),
            Ev::Map(map(1010, (1 << 40) - 2, 2, 3)),
            Ev::Map(map(u64::MAX - 10, 7, 10, 3)),
            Ev::DevEnd,
            Ev::DevBegin(dev(16_777_215)),
            Ev::DevEnd,
            Ev::DevBegin(dev(0)),
            Ev::Ref("17".into()),
            Ev::DevEnd,
            Ev::SbEnd,
        ]
    }

    #[test]
    fn round_trips_the_xml_writer() {
        let evs = sample();
        let xml = to_xml(&evs);
        let (got, stats) = read(&xml[..]).unwrap();
        assert_eq!(got, evs);
        assert_eq!(
            stats,
            XmlStats {
                nr_devices: 3,
                nr_defs: 3,
                nr_refs: 4,
                device_entries: 1 + 2 + 10,
                def_entries: 65 + 10,
                // "17", "<&>" and "17" again ("empty" reaches nothing)
                ref_entries: 65 + 10 + 65,
            }
        );
        // The same through a reader that returns a few bytes at a time.
        assert_eq!(read(Trickle { data: &xml, n: 0 }), Ok((got, stats)));
        // Re-emitting gives the same bytes.
        let mut w = XmlWriter::new(Vec::new());
        read_xml(&xml[..], &mut w).unwrap();
        assert_eq!(w.into_inner(), xml);
    }

    #[test]
    fn does_not_call_finish() {
        let mut evs = sample();
        evs.push(Ev::Finish);
        let (got, _) = read(&to_xml(&evs)[..]).unwrap();
        assert_ne!(got.last(), Some(&Ev::Finish));
    }

    const SB: &str = "<superblock uuid=\"\" time=\"1\" transaction=\"2\" data_block_size=\"128\" nr_data_blocks=\"1000\">";

    #[test]
    fn accepts_the_whole_grammar() {
        let xml = "\u{feff}<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
            <!-- a comment with <tags> & -- dashes -->\r\n\
            <superblock\n  uuid='x&amp;&#65;&#x42;&lt;&gt;&quot;&apos;'\ttime = \"1\"\n transaction=\"2\" flags=\"0\" version=\"2\" \
            data_block_size=\"256\" nr_data_blocks=\"&#49;000\" metadata_snap=\"6\" >\n\
            <def name=\"e\"/>\n\
            <!-- between -->\n\
            <def name=\"d\"><range_mapping origin_begin=\"0\" data_begin=\"0\" length=\"2\" time=\"0\"></range_mapping></def>\n\
            <device dev_id=\"1\" mapped_blocks=\"3\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\">\n\
              <ref name=\"d\"></ref >\n\
              <ref name='e'/>\n\
              <!-- inside -->\n\
              <single_mapping origin_block=\"2\" data_block=\"999\" time=\"0\" />\n\
              <range_mapping length=\"1\" time=\"0\" origin_begin=\"0003\" data_begin=\"7\"/>\n\
            </device   >\n\
            <device dev_id=\"2\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\"/>\n\
            <device dev_id=\"3\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\"></device>\n\
            </superblock>\n<!-- trailing -->\n\n";
        let (evs, stats) = read(xml.as_bytes()).unwrap();
        let mut want_sb = sb("x&AB<>\"'", 0, 2, 1000);
        want_sb.time = 1;
        want_sb.transaction = 2;
        want_sb.data_block_size = 256;
        want_sb.metadata_snap = Some(6);
        let dev0 = |id| DeviceInfo {
            dev_id: id,
            mapped_blocks: 0,
            transaction: 0,
            creation_time: 0,
            snap_time: 0,
        };
        assert_eq!(
            evs,
            vec![
                Ev::SbBegin(want_sb),
                Ev::DefBegin("e".into()),
                Ev::DefEnd,
                Ev::DefBegin("d".into()),
                Ev::Map(map(0, 0, 2, 0)),
                Ev::DefEnd,
                Ev::DevBegin(DeviceInfo {
                    mapped_blocks: 3,
                    ..dev0(1)
                }),
                Ev::Ref("d".into()),
                Ev::Ref("e".into()),
                Ev::Map(map(2, 999, 1, 0)),
                Ev::Map(map(3, 7, 1, 0)),
                Ev::DevEnd,
                Ev::DevBegin(dev0(2)),
                Ev::DevEnd,
                Ev::DevBegin(dev0(3)),
                Ev::DevEnd,
                Ev::SbEnd,
            ]
        );
        assert_eq!(stats.ref_entries, 2);
        assert_eq!(stats.device_entries, 2);
        assert_eq!(stats.def_entries, 2);
        assert_eq!(
            read(Trickle {
                data: xml.as_bytes(),
                n: 3
            }),
            Ok((evs, stats))
        );

        // An empty root, defaults for flags and version; whitespace in values normalised.
        let (evs, _) = read(
            "<superblock uuid=\"a\tb\r\nc\" time=\"0\" transaction=\"0\" data_block_size=\"128\" nr_data_blocks=\"0\"/>"
                .as_bytes(),
        )
        .unwrap();
        let mut want = sb("a b c", 0, 2, 0);
        want.time = 0;
        want.transaction = 0;
        want.data_block_size = 128;
        assert_eq!(evs, vec![Ev::SbBegin(want), Ev::SbEnd]);
    }

    /// Each case: the document after `SB` + newline, and the full error.
    const CASES: &[(&str, &str)] = &[
        // Structure.
        ("  <foo/>\n</superblock>", "line 2, column 3: unknown element <foo>"),
        ("<device dev_id=\"1\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\">\n  <device dev_id=\"2\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\"/>",
            "line 3, column 3: unexpected <device> inside <device>"),
        ("<single_mapping origin_block=\"0\" data_block=\"0\" time=\"0\"/>",
            "line 2, column 1: unexpected <single_mapping> inside <superblock>"),
        ("<device dev_id=\"1\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\"><def name=\"a\"/>",
            "line 2, column 86: unexpected <def> inside <device>"),
        ("<def name=\"a\"><ref name=\"a\"/></def>", "line 2, column 15: unexpected <ref> inside <def>"),
        ("<def name=\"a\"><range_mapping origin_begin=\"0\" data_begin=\"0\" length=\"2\" time=\"0\"><ref name=\"a\"/>",
            "line 2, column 82: unexpected <ref> inside <range_mapping>"),
        ("<superblock/>", "line 2, column 1: unexpected <superblock> inside <superblock>"),
        ("</device>", "line 2, column 1: mismatched closing tag </device> (expected </superblock>)"),
        ("<def name=\"a\">\n</device>", "line 3, column 1: mismatched closing tag </device> (expected </def>)"),
        ("</superblock>\n<device/>", "line 3, column 1: unexpected <device> after the root element"),
        ("</superblock>x", "line 2, column 14: unexpected text \"x\" after the root element"),
        ("</superblock></superblock>", "line 2, column 14: unexpected closing tag </superblock>"),
        ("  hello <def name=\"a\"/>", "line 2, column 3: unexpected text \"hello \""),
        ("<def name=\"a\">\n", "line 3, column 1: unexpected end of input (unclosed <def>)"),
        ("<device dev_id=\"1\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\">\n <ref",
            "line 3, column 6: unexpected end of input inside a tag (unclosed <device>)"),
        ("<!-- x", "line 2, column 7: unexpected end of input inside a comment (unclosed <superblock>)"),
        ("<!DOCTYPE x>", "line 2, column 1: unsupported markup (only elements and comments are allowed)"),
        ("<?xml version=\"1.0\"?>", "line 2, column 1: the XML declaration must be at the start of the input"),
        ("<?foo?>", "line 2, column 1: unexpected processing instruction"),
        ("< def/>", "line 2, column 2: expected an element name after '<'"),
        ("<def name=\"a\"/ >", "line 2, column 15: expected '>' after '/' in <def>"),
        ("<def name=\"a\"name=\"b\"/>", "line 2, column 14: unexpected 'n' in <def>"),
        ("<def name \"a\"/>", "line 2, column 11: expected '=' after attribute \"name\""),
        ("<def name=a/>", "line 2, column 11: expected a quoted value for attribute \"name\""),
        ("<def name=\"a<b\"/>", "line 2, column 13: '<' is not allowed in an attribute value"),
        ("<def name=\"a&foo;\"/>", "line 2, column 13: unknown entity &foo;"),
        ("<def name=\"a&#0;\"/>", "line 2, column 13: invalid character reference &#0;"),
        ("<def name=\"a&amp\"/>", "line 2, column 13: unterminated entity reference"),
        // Attributes.
        ("<def nam=\"a\"/>", "line 2, column 1: unknown attribute \"nam\" in <def>"),
        ("<def name=\"a\" name=\"b\"/>", "line 2, column 1: duplicate attribute \"name\" in <def>"),
        ("<def/>", "line 2, column 1: missing attribute \"name\" in <def>"),
        ("<def name=\"\"/>", "line 2, column 1: empty name in <def>"),
        ("<device dev_id=\"1\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\"/>",
            "line 2, column 1: missing attribute \"snap_time\" in <device>"),
        ("<device dev_id=\"x1\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\"/>",
            "line 2, column 1: attribute \"dev_id\" in <device> is not a number: \"x1\""),
        ("<device dev_id=\"\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\"/>",
            "line 2, column 1: attribute \"dev_id\" in <device> is not a number: \"\""),
        ("<device dev_id=\"-1\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\"/>",
            "line 2, column 1: attribute \"dev_id\" in <device> is not a number: \"-1\""),
        ("<device dev_id=\" 1\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\"/>",
            "line 2, column 1: attribute \"dev_id\" in <device> is not a number: \" 1\""),
        ("<device dev_id=\"1\" mapped_blocks=\"18446744073709551616\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\"/>",
            "line 2, column 1: attribute \"mapped_blocks\" in <device> is too large: \"18446744073709551616\""),
        ("<device dev_id=\"16777216\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\"/>",
            "line 2, column 1: dev_id 16777216 out of range (must be < 2^24)"),
        ("<device dev_id=\"1\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"4294967296\" snap_time=\"0\"/>",
            "line 2, column 1: creation_time 4294967296 out of range (must be < 2^32)"),
        ("<device dev_id=\"1\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"4294967296\"/>",
            "line 2, column 1: snap_time 4294967296 out of range (must be < 2^32)"),
        ("<device dev_id=\"3\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\"/>\n\
          <device dev_id=\"3\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\"/>",
            "line 3, column 1: duplicate dev_id 3"),
        ("<def name=\"a\"/><def name=\"a\"/>", "line 2, column 16: duplicate def name \"a\""),
        ("<def name=\"a\"/><device dev_id=\"1\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\"><ref name=\"x\"/>",
            "line 2, column 101: ref to undefined def \"x\""),
        ("<device dev_id=\"1\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\"><ref name=\"a\"/></device><def name=\"a\"/>",
            "line 2, column 86: ref to undefined def \"a\""),
        ("<device dev_id=\"1\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\"><ref/>",
            "line 2, column 86: missing attribute \"name\" in <ref>"),
        // Mappings.
        ("<def name=\"a\"><range_mapping origin_begin=\"0\" data_begin=\"0\" time=\"0\"/>",
            "line 2, column 15: missing attribute \"length\" in <range_mapping>"),
        ("<def name=\"a\"><range_mapping origin_begin=\"0\" data_begin=\"0\" length=\"0\" time=\"0\"/>",
            "line 2, column 15: length 0 in <range_mapping> (must be at least 1)"),
        ("<def name=\"a\"><single_mapping origin_block=\"0\" data_block=\"0\" time=\"16777216\"/>",
            "line 2, column 15: mapping time 16777216 out of range (must be < 2^24)"),
        ("<def name=\"a\"><single_mapping origin_block=\"0\" data_block=\"0\" length=\"1\" time=\"0\"/>",
            "line 2, column 15: unknown attribute \"length\" in <single_mapping>"),
        ("<def name=\"a\"><range_mapping origin_begin=\"0\" data_begin=\"990\" length=\"11\" time=\"0\"/>",
            "line 2, column 15: data block 1000 beyond nr_data_blocks 1000"),
        ("<def name=\"a\"><single_mapping origin_block=\"0\" data_block=\"1099511627776\" time=\"0\"/>",
            "line 2, column 15: data block 1099511627776 beyond the 40-bit limit"),
        ("<def name=\"a\"><range_mapping origin_begin=\"0\" data_begin=\"18446744073709551615\" length=\"2\" time=\"0\"/>",
            "line 2, column 15: data blocks from 18446744073709551615 with length 2 beyond the 40-bit limit"),
        ("<def name=\"a\"><range_mapping origin_begin=\"18446744073709551615\" data_begin=\"0\" length=\"1\" time=\"0\"/>",
            "line 2, column 15: mapping at origin 18446744073709551615 with length 1 overflows the origin range"),
        ("<def name=\"a\">\n  <range_mapping origin_begin=\"110\" data_begin=\"0\" length=\"10\" time=\"0\"/>\n  <range_mapping origin_begin=\"115\" data_begin=\"0\" length=\"10\" time=\"0\"/>",
            "line 4, column 3: mapping at origin 115 overlaps the previous one (ends at 120)"),
        ("<device dev_id=\"1\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\">\n  <single_mapping origin_block=\"110\" data_block=\"0\" time=\"0\"/>\n  <single_mapping origin_block=\"100\" data_block=\"0\" time=\"0\"/>",
            "line 4, column 3: mapping at origin 100 is out of order (the previous one begins at 110)"),
        ("<def name=\"a\"><range_mapping origin_begin=\"10\" data_begin=\"0\" length=\"10\" time=\"0\"/></def>\n\
          <device dev_id=\"1\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\">\n\
          <single_mapping origin_block=\"15\" data_block=\"0\" time=\"0\"/>\n<ref name=\"a\"/>",
            "line 5, column 1: ref to def \"a\" at origin 10 is out of order (the previous mapping begins at 15)"),
        ("<def name=\"a\"><range_mapping origin_begin=\"10\" data_begin=\"0\" length=\"10\" time=\"0\"/></def>\n\
          <device dev_id=\"1\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\">\n\
          <range_mapping origin_begin=\"5\" data_begin=\"0\" length=\"6\" time=\"0\"/>\n<ref name=\"a\"/>",
            "line 5, column 1: ref to def \"a\" at origin 10 overlaps the previous mapping (ends at 11)"),
        ("<def name=\"a\"><range_mapping origin_begin=\"10\" data_begin=\"0\" length=\"10\" time=\"0\"/></def>\n\
          <device dev_id=\"1\" mapped_blocks=\"0\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\">\n\
          <ref name=\"a\"/>\n<single_mapping origin_block=\"19\" data_block=\"0\" time=\"0\"/>",
            "line 5, column 1: mapping at origin 19 overlaps the previous one (ends at 20)"),
    ];

    #[test]
    fn reports_each_problem_where_it_is() {
        for &(body, want) in CASES {
            let xml = format!("{SB}\n{body}");
            let got = err(&xml);
            assert_eq!(got, want, "for {body}");
            // The same from a reader that returns a few bytes at a time.
            let trickled = read(Trickle {
                data: xml.as_bytes(),
                n: 0,
            })
            .unwrap_err();
            assert_eq!(trickled, got, "trickled, for {body}");
        }
        let bad_utf8 = read(&b"<superblock uuid=\"\xff\"/>"[..]).unwrap_err();
        assert_eq!(
            bad_utf8,
            "line 1, column 19: attribute \"uuid\" is not valid UTF-8"
        );
    }

    #[test]
    fn checks_the_superblock() {
        let attrs = |a: &str| format!("<superblock {a}></superblock>");
        let ok =
            "uuid=\"\" time=\"1\" transaction=\"2\" data_block_size=\"128\" nr_data_blocks=\"10\"";
        assert!(read(attrs(ok).as_bytes()).is_ok());
        for (a, want) in [
            (
                "uuid=\"\" time=\"1\" transaction=\"2\" data_block_size=\"128\"",
                "missing attribute \"nr_data_blocks\" in <superblock>",
            ),
            (
                "time=\"1\" transaction=\"2\" data_block_size=\"128\" nr_data_blocks=\"10\"",
                "missing attribute \"uuid\" in <superblock>",
            ),
            (
                &format!("{ok} flags=\"2\""),
                "superblock flags 2 not supported (must be 0 or 1)",
            ),
            (
                &format!("{ok} version=\"3\""),
                "superblock version 3 not supported (must be 1 or 2)",
            ),
            (
                &format!("{ok} version=\"0\""),
                "superblock version 0 not supported (must be 1 or 2)",
            ),
            (
                &format!("{ok} bogus=\"0\""),
                "unknown attribute \"bogus\" in <superblock>",
            ),
            (
                &ok.replace("time=\"1\"", "time=\"4294967296\""),
                "superblock time 4294967296 out of range (must be < 2^32)",
            ),
            (
                &ok.replace("\"128\"", "\"129\""),
                "data_block_size 129 invalid (must be a multiple of 128 from 128 to 2097152)",
            ),
            (
                &ok.replace("\"128\"", "\"0\""),
                "data_block_size 0 invalid (must be a multiple of 128 from 128 to 2097152)",
            ),
            (
                &ok.replace("\"128\"", "\"2097280\""),
                "data_block_size 2097280 invalid (must be a multiple of 128 from 128 to 2097152)",
            ),
        ] {
            assert_eq!(
                err(&attrs(a)),
                format!("line 1, column 1: {want}"),
                "for {a}"
            );
        }
        assert_eq!(
            err(""),
            "line 1, column 1: unexpected end of input (no <superblock> element)"
        );
        assert_eq!(
            err("\n\n  "),
            "line 3, column 3: unexpected end of input (no <superblock> element)"
        );
        assert_eq!(
            err("<device dev_id=\"1\"/>"),
            "line 1, column 1: expected <superblock> as the root element, found <device>"
        );
        assert_eq!(
            err(&format!(
                "{SB}\n<def name=\"a\">\n  <range_mapping origin_begin=\"0\""
            )),
            "line 3, column 34: unexpected end of input inside a tag (unclosed <def>)"
        );
        assert_eq!(
            err(&format!("{SB}</superblock><!-- x")),
            "line 1, column 109: unexpected end of input inside a comment"
        );
    }

    /// Every truncation and many single-byte corruptions of a document: no
    /// panic, and the same outcome however the input is chunked.
    #[test]
    fn truncations_and_corruptions_are_chunking_independent() {
        let mut xml = b"<?xml version=\"1.0\"?>\n<!-- c -->\n".to_vec();
        xml.extend_from_slice(&to_xml(&sample()));
        for cut in 0..xml.len() {
            let whole = read(&xml[..cut]);
            assert!(whole.is_err(), "prefix of {cut} bytes accepted");
            assert_eq!(
                read(Trickle {
                    data: &xml[..cut],
                    n: cut
                }),
                whole
            );
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..3000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut bad = xml.clone();
            let at = (seed % bad.len() as u64) as usize;
            bad[at] = b"<>/=\"' &;#x0a9\n-!?"[(seed >> 32) as usize % 18];
            let whole = read(&bad[..]);
            assert_eq!(read(Trickle { data: &bad, n: at }), whole);
        }
    }

    /// Fails on the n-th mapping (never, for u64::MAX).
    struct FailOn(u64);

    impl MetadataVisitor for FailOn {
        fn mapping(&mut self, _: &Mapping) -> io::Result<()> {
            self.0 -= 1;
            if self.0 == 0 {
                return Err(io::Error::other("no space"));
            }
            Ok(())
        }
        fn reference(&mut self, _: &str) -> io::Result<()> {
            Ok(())
        }
        fn finish(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn visitor_and_read_errors_are_reported() {
        let xml = to_xml(&sample());
        match read_xml(&xml[..], &mut FailOn(2)) {
            Err(XmlError::Visitor { line, col, source }) => {
                assert_eq!((line, col), (4, 5));
                assert_eq!(source.to_string(), "no space");
            }
            other => panic!("{other:?}"),
        }
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
        }
        match read_xml(Broken, &mut Recorder::default()) {
            Err(XmlError::Read(e)) => assert_eq!(e.to_string(), "disk on fire"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn long_comments_and_tags_cross_chunks() {
        let mut xml = String::from(SB);
        xml.push_str("<!--");
        xml.push_str(&"x\n".repeat(CHUNK));
        xml.push_str("-->\n<def name=\"");
        xml.push_str(&"n".repeat(CHUNK + 10));
        xml.push_str("\"/>\n</superblock>");
        let (evs, _) = read(xml.as_bytes()).unwrap();
        assert_eq!(evs[1], Ev::DefBegin("n".repeat(CHUNK + 10)));
        // Line numbers survive the long comment.
        let bad = xml.replace("</superblock>", "</super>");
        assert_eq!(
            err(&bad),
            format!(
                "line {}, column 1: mismatched closing tag </super> (expected </superblock>)",
                CHUNK + 3
            )
        );
    }

    /// Every thin_dump XML output recorded from the peer re-emits byte for byte.
    #[test]
    fn peer_dumps_re_emit_identically() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/testdata");
        if !root.is_dir() {
            return;
        }
        let mut stack = vec![root];
        let mut checked = 0;
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let name = path.file_name().unwrap().to_string_lossy();
                if !name.starts_with("thin_dump") || !name.ends_with(".stdout") {
                    continue;
                }
                let data = std::fs::read(&path).unwrap();
                if !data.starts_with(b"<superblock") {
                    continue;
                }
                // The peer's `thin_dump -m` prints nr_data_blocks="0" (a
                // metadata snapshot's superblock has no space maps): a restore
                // must refuse any mapping in that, so check with a big pool.
                let header_end = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
                let no_pool = b" nr_data_blocks=\"0\">";
                let big_pool = b" nr_data_blocks=\"1099511627776\">";
                let data = if data[..header_end].ends_with(no_pool) {
                    if let Err(e) = read(&data[..]) {
                        assert!(
                            e.ends_with("beyond nr_data_blocks 0"),
                            "{}: {e}",
                            path.display()
                        );
                    }
                    [
                        &data[..header_end - no_pool.len()],
                        big_pool,
                        &data[header_end..],
                    ]
                    .concat()
                } else {
                    data
                };
                let mut w = XmlWriter::new(Vec::new());
                let stats = read_xml(&data[..], &mut w)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert!(
                    w.into_inner() == data,
                    "{} does not re-emit identically",
                    path.display()
                );
                let (evs, stats2) = read(Trickle { data: &data, n: 0 }).unwrap();
                assert_eq!(stats, stats2);
                // What the devices reach adds up to what they claim.
                let mapped: u64 = evs
                    .iter()
                    .map(|e| match e {
                        Ev::DevBegin(d) => d.mapped_blocks,
                        _ => 0,
                    })
                    .sum();
                if !name.contains("skip_mappings") {
                    assert_eq!(
                        stats.device_entries + stats.ref_entries,
                        mapped,
                        "{}",
                        path.display()
                    );
                }
                checked += 1;
            }
        }
        assert!(checked > 0);
    }

    /// `cargo test --release xml_read -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn xml_read_throughput() {
        let mut w = XmlWriter::new(Vec::with_capacity(520 << 20));
        let mut sbi = sb("", 0, 2, 1 << 40);
        sbi.data_block_size = 128;
        w.superblock_begin(&sbi).unwrap();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut lines = 0u64;
        for id in 0..31 {
            w.device_begin(&dev(id)).unwrap();
            let mut origin = 0;
            for _ in 0..200_000 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let len = if seed & 1 == 0 {
                    1
                } else {
                    1 + (seed >> 8) % 64
                };
                let m = map(
                    origin,
                    (seed >> 20) % (1 << 26),
                    len,
                    ((seed >> 50) % 8) as u32,
                );
                w.mapping(&m).unwrap();
                origin += len + (seed >> 40) % 4;
                lines += 1;
            }
            w.device_end().unwrap();
        }
        w.superblock_end().unwrap();
        let xml = w.into_inner();

        let mut best = f64::MAX;
        for _ in 0..3 {
            let t = std::time::Instant::now();
            let stats = read_xml(&xml[..], &mut FailOn(u64::MAX)).unwrap();
            best = best.min(t.elapsed().as_secs_f64());
            assert!(stats.device_entries > 0);
        }
        println!(
            "xml_read: {} MB, {lines} mapping lines, best {:.3} s: {:.0} MB/s, {:.1} M lines/s",
            xml.len() / 1_000_000,
            best,
            xml.len() as f64 / 1e6 / best,
            lines as f64 / 1e6 / best
        );

        // A real dump, when the shared test data is there.
        let medium =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/testdata/perf/medium.xml.gz");
        if let Ok(f) = std::fs::File::open(&medium) {
            let mut xml = Vec::new();
            flate2::read::GzDecoder::new(f)
                .read_to_end(&mut xml)
                .unwrap();
            let t = std::time::Instant::now();
            let stats = read_xml(&xml[..], &mut FailOn(u64::MAX)).unwrap();
            let secs = t.elapsed().as_secs_f64();
            println!(
                "xml_read: perf/medium.xml: {} MB in {secs:.3} s: {:.0} MB/s ({stats:?})",
                xml.len() / 1_000_000,
                xml.len() as f64 / 1e6 / secs
            );
        }
    }
}
