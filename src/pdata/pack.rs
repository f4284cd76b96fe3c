//! The pack format of `thin_metadata_pack` / `thin_metadata_unpack`
//! (version 3, compatible with thin-provisioning-tools 1.x in both
//! directions). The format is described in docs/pack-format.md; in short:
//!
//! ```text
//! header   u64 magic 0xa537a0aa6309ef77, u64 version 3, u64 block size,
//!          u64 number of blocks in the image            (little-endian)
//! chunks   u64 length L, then L bytes of a zlib stream; repeated to EOF
//! chunk    (decompressed) entries: u64 block index, then the block's
//!          instructions, which rebuild exactly one block
//! ```
//!
//! A pack keeps only the blocks that carry a valid checksum of a known
//! persistent-data kind (thin, cache and era superblocks, btree nodes, space
//! map bitmaps and indexes, array blocks); every other block of the image
//! unpacks as zeros. Btree nodes are stored as delta-coded lists of their
//! keys and values, everything else as literal bytes.
//!
//! The instructions (one byte: the high nibble is the operation, the low
//! nibble `n` its parameter; `V` is the last value produced):
//!
//! | op | meaning |
//! |----|---------|
//! | `0n` | value = next `n` bytes (LE); emit (`n`, here and below, is 1, 2, 4 or 8) |
//! | `1n` / `3n` | value = V + n / V - n; emit |
//! | `2n` / `4n` | value = V + / - the next `n` bytes (LE); emit |
//! | `5n` | emit V `n` times |
//! | `6n xx` | emit V `(n << 8) | xx` times |
//! | `7n` | run the next instruction `n` times |
//! | `8n xx` | run the next instruction `(n << 8) | xx` times |
//! | `an` | copy `L` literal bytes, `L` = the next `n` bytes (LE) |
//! | `bn xx` | `c = (n << 8) | xx`; two lists of `c` values follow, `a` then `b`; emit `(a << 24) | b` for each pair (thin mapping values: data block and time) |
//!
//! "Emit" writes the value as 8 little-endian bytes, or, inside `b`, appends
//! it to the list being built.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;

use flate2::read::ZlibDecoder;
use flate2::write::ZlibEncoder;
use flate2::Compression;

use super::checksum;
use super::io::BlockDevice;
use super::{le32, le64, BLOCK_SIZE};

/// First 8 bytes of every pack file.
pub const MAGIC: u64 = 0xa537_a0aa_6309_ef77;
/// The pack format version this module reads and writes.
pub const VERSION: u64 = 3;
/// Bytes of the file header.
pub const HEADER_LEN: usize = 32;
/// Blocks per compressed chunk in the packs we write (the original tool
/// uses the same batch size).
pub const BLOCKS_PER_CHUNK: usize = 128;

/// Checksum salts of the blocks a pack keeps: thin superblock, btree node,
/// space-map bitmap, metadata-sm index, array block, cache superblock, era
/// superblock. The original unpacker refuses any block outside this set.
const PACKED_SALTS: [u32; 7] = [
    160_774,
    121_107,
    240_779,
    160_478,
    595_846_735,
    9_031_977,
    146_538_381,
];

/// Largest compressed chunk accepted when the pack's length is unknown.
const MAX_CHUNK: u64 = 1 << 30;
/// Largest decompressed chunk accepted (a chunk of ours holds at most
/// 128 blocks, about 0.5 MiB; the original's are of the same order).
const MAX_RAW_CHUNK: u64 = 1 << 30;
/// Instructions run per block at most (a real block needs about 1100).
const MAX_STEPS: u32 = 1 << 16;
/// Nesting of repeat instructions at most.
const MAX_DEPTH: u32 = 4;

/// True when `block` carries a valid checksum of a kind packs keep.
pub fn is_packable(block: &[u8]) -> bool {
    let raw = super::crc::crc32c(&block[4..BLOCK_SIZE]) ^ 0xffff_ffff ^ checksum::stored(block);
    PACKED_SALTS.contains(&raw)
}

/// What is wrong with a pack file.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("Not a pack file (the file is shorter than the {HEADER_LEN}-byte header)")]
    ShortHeader,
    #[error("Not a pack file (magic {0:#018x}, expected {MAGIC:#018x})")]
    NotAPack(u64),
    #[error("pack format version {0} is not supported (only version {VERSION})")]
    Version(u64),
    #[error("pack block size {0} is not supported (only {BLOCK_SIZE})")]
    BlockSize(u64),
    #[error("pack says the image has {0} blocks, more than a file can hold")]
    TooManyBlocks(u64),
    #[error("truncated pack: the {what} at byte {offset} runs past the end of the file")]
    Truncated { what: &'static str, offset: u64 },
    #[error("corrupt pack: the compressed chunk at byte {offset}: {msg}")]
    Chunk { offset: u64, msg: String },
    #[error("corrupt pack: block {block} (in the chunk at byte {offset}): {msg}")]
    Block {
        block: u64,
        offset: u64,
        msg: String,
    },
    #[error(
        "corrupt pack: block {block} (in the chunk at byte {offset}) is beyond the image's {nr_blocks} blocks"
    )]
    OutOfRange {
        block: u64,
        offset: u64,
        nr_blocks: u64,
    },
    #[error(
        "corrupt pack: block {block} (in the chunk at byte {offset}) unpacks to a block with no valid metadata checksum"
    )]
    BadChecksum { block: u64, offset: u64 },
    #[error("I/O error reading the pack: {0}")]
    Io(#[from] io::Error),
}

impl PackError {
    /// True for errors of the medium rather than of the pack's contents.
    pub fn is_io(&self) -> bool {
        matches!(self, PackError::Io(_))
    }
}

/// The header of a pack: what the unpacked image looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub block_size: u64,
    /// Blocks of the unpacked image (its size is `nr_blocks * block_size`).
    pub nr_blocks: u64,
}

impl Header {
    pub fn image_bytes(&self) -> u64 {
        self.nr_blocks * self.block_size
    }
}

// ---------------------------------------------------------------------------
// Encoding

/// Operand width for `v`: the fewest of 1, 2, 4 or 8 bytes that hold it
/// (the original unpacker accepts no other width).
fn width(v: u64) -> usize {
    match v {
        0..=0xff => 1,
        0x100..=0xffff => 2,
        0x1_0000..=0xffff_ffff => 4,
        _ => 8,
    }
}

fn push_uint(out: &mut Vec<u8>, v: u64, w: usize) {
    out.extend_from_slice(&v.to_le_bytes()[..w]);
}

/// `an`: copy `bytes` literally.
fn literal(out: &mut Vec<u8>, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    let w = width(bytes.len() as u64);
    out.push(0xa0 | w as u8);
    push_uint(out, bytes.len() as u64, w);
    out.extend_from_slice(bytes);
}

/// A 12-bit count for `6n`/`8n`/`bn`: the opcode byte and the low byte.
fn op12(op: u8, n: usize) -> [u8; 2] {
    debug_assert!(n < 4096);
    [op | (n >> 8) as u8, n as u8]
}

/// The instruction taking `last` to `v` by a delta (the original packer
/// always uses one after a list's first value), or None when `v` is `last`.
fn delta(last: u64, v: u64) -> Option<Vec<u8>> {
    let (up, d) = if v > last {
        (true, v - last)
    } else {
        (false, last - v)
    };
    if d == 0 {
        return None;
    }
    let bytes = if d <= 15 {
        vec![if up { 0x10 } else { 0x30 } | d as u8]
    } else {
        let w = width(d);
        let mut b = vec![if up { 0x20 } else { 0x40 } | w as u8];
        push_uint(&mut b, d, w);
        b
    };
    Some(bytes)
}

/// Encode `vals` as a list: a literal first, then runs of equal values,
/// repeated deltas and single deltas or literals.
fn encode_list(out: &mut Vec<u8>, vals: &[u64]) {
    let Some(&first) = vals.first() else {
        return;
    };
    let lit = |out: &mut Vec<u8>, v: u64| {
        let w = width(v);
        out.push(w as u8);
        push_uint(out, v, w);
    };
    lit(out, first);
    let mut last = first;
    let mut i = 1;
    while i < vals.len() {
        let v = vals[i];
        if v == last {
            let mut r = 1;
            while i + r < vals.len() && vals[i + r] == last && r < 4095 {
                r += 1;
            }
            if r <= 15 {
                out.push(0x50 | r as u8);
            } else {
                out.extend_from_slice(&op12(0x60, r));
            }
            i += r;
            continue;
        }
        match delta(last, v) {
            Some(instr) => {
                // How many of the following values continue with the same
                // step, modulo 2^64 (as the original packer counts them).
                let step = v.wrapping_sub(last);
                let mut k = 1;
                while i + k < vals.len()
                    && k < 4095
                    && vals[i + k].wrapping_sub(vals[i + k - 1]) == step
                {
                    k += 1;
                }
                if k >= 2 {
                    if k <= 15 {
                        out.push(0x70 | k as u8);
                    } else {
                        out.extend_from_slice(&op12(0x80, k));
                    }
                }
                out.extend_from_slice(&instr);
                last = vals[i + k - 1];
                i += k;
            }
            None => {
                lit(out, v);
                last = v;
                i += 1;
            }
        }
    }
}

/// The layout of a btree node worth encoding as lists: (leaf, max_entries,
/// value_size), or None to store the block literally.
fn node_layout(block: &[u8]) -> Option<(bool, usize, usize)> {
    if !checksum::verify(block, checksum::BlockKind::BTreeNode) {
        return None;
    }
    let flags = le32(block, 4);
    let leaf = match flags {
        1 => false,
        2 => true,
        _ => return None,
    };
    let max = le32(block, 20) as usize;
    let vsize = le32(block, 24) as usize;
    if max == 0 || max >= 4096 || vsize == 0 || 32 + max * (8 + vsize) > BLOCK_SIZE {
        return None;
    }
    if !leaf && vsize != 8 {
        return None;
    }
    Some((leaf, max, vsize))
}

/// Append the instructions that rebuild `block` (4096 bytes) to `out`.
pub fn encode_block(block: &[u8], out: &mut Vec<u8>) {
    debug_assert_eq!(block.len(), BLOCK_SIZE);
    let Some((leaf, max, vsize)) = node_layout(block) else {
        literal(out, block);
        return;
    };
    literal(out, &block[..32]);
    let keys: Vec<u64> = (0..max).map(|i| le64(block, 32 + 8 * i)).collect();
    encode_list(out, &keys);
    let vstart = 32 + 8 * max;
    let tail = if vsize == 8 {
        let vals: Vec<u64> = (0..max).map(|i| le64(block, vstart + 8 * i)).collect();
        if leaf {
            // Thin mapping values: data block << 24 | time, as two lists.
            out.extend_from_slice(&op12(0xb0, max));
            let hi: Vec<u64> = vals.iter().map(|v| v >> 24).collect();
            let lo: Vec<u64> = vals.iter().map(|v| v & 0xff_ffff).collect();
            encode_list(out, &hi);
            encode_list(out, &lo);
        } else {
            encode_list(out, &vals);
        }
        vstart + 8 * max
    } else {
        vstart
    };
    literal(out, &block[tail..]);
}

/// Writes a pack: the header, then the blocks given to [`add`](Self::add)
/// in zlib-compressed chunks of [`BLOCKS_PER_CHUNK`] blocks.
pub struct PackWriter<W: Write> {
    w: W,
    raw: Vec<u8>,
    in_chunk: usize,
    blocks: u64,
}

impl<W: Write> PackWriter<W> {
    /// Start a pack of an image of `nr_blocks` 4 KiB blocks.
    pub fn new(mut w: W, nr_blocks: u64) -> io::Result<Self> {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        h[8..16].copy_from_slice(&VERSION.to_le_bytes());
        h[16..24].copy_from_slice(&(BLOCK_SIZE as u64).to_le_bytes());
        h[24..32].copy_from_slice(&nr_blocks.to_le_bytes());
        w.write_all(&h)?;
        Ok(PackWriter {
            w,
            raw: Vec::new(),
            in_chunk: 0,
            blocks: 0,
        })
    }

    /// Add the block at `index` of the image (4096 bytes).
    pub fn add(&mut self, index: u64, block: &[u8]) -> io::Result<()> {
        self.raw.extend_from_slice(&index.to_le_bytes());
        encode_block(block, &mut self.raw);
        self.in_chunk += 1;
        self.blocks += 1;
        if self.in_chunk == BLOCKS_PER_CHUNK {
            self.flush_chunk()?;
        }
        Ok(())
    }

    fn flush_chunk(&mut self) -> io::Result<()> {
        if self.in_chunk == 0 {
            return Ok(());
        }
        let mut z = ZlibEncoder::new(Vec::new(), Compression::default());
        z.write_all(&self.raw)?;
        let data = z.finish()?;
        self.w.write_all(&(data.len() as u64).to_le_bytes())?;
        self.w.write_all(&data)?;
        self.raw.clear();
        self.in_chunk = 0;
        Ok(())
    }

    /// Write the last chunk; returns the writer and the number of blocks packed.
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        self.flush_chunk()?;
        self.w.flush()?;
        Ok((self.w, self.blocks))
    }
}

/// Why packing failed: reading the device, or writing the pack.
#[derive(Debug, thiserror::Error)]
pub enum PackWriteError {
    #[error("{0}")]
    Read(#[from] super::Error),
    #[error("writing the pack: {0}")]
    Write(#[from] io::Error),
}

/// Blocks read per `pread` while packing.
const READ_RUN: usize = 256;

/// Pack every block of `dev` that [`is_packable`] into `w`. Returns the
/// writer and the number of blocks packed.
pub fn pack_device<W: Write>(
    dev: &BlockDevice,
    w: W,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(W, u64), PackWriteError> {
    let nr = dev.nr_blocks();
    let mut pw = PackWriter::new(w, nr)?;
    let mut buf = vec![0u8; READ_RUN * BLOCK_SIZE];
    let mut first = 0u64;
    while first < nr {
        let count = (nr - first).min(READ_RUN as u64) as usize;
        let run = &mut buf[..count * BLOCK_SIZE];
        dev.read_run(first, run)?;
        for (i, block) in run.chunks_exact(BLOCK_SIZE).enumerate() {
            if block.iter().any(|&b| b != 0) && is_packable(block) {
                pw.add(first + i as u64, block)?;
            }
        }
        first += count as u64;
        progress(first, nr);
    }
    Ok(pw.finish()?)
}

// ---------------------------------------------------------------------------
// Decoding

/// Where instructions put their values: the block, or a list of `b`.
enum Dest<'x, 'b> {
    Block(&'x mut BlockOut<'b>),
    List(&'x mut Vec<u64>, usize),
}

struct BlockOut<'b> {
    buf: &'b mut [u8],
    cur: usize,
}

impl BlockOut<'_> {
    fn room(&self) -> usize {
        self.buf.len() - self.cur
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), String> {
        if bytes.len() > self.room() {
            return Err(format!(
                "instructions write past the end of the block (at byte {})",
                self.cur
            ));
        }
        self.buf[self.cur..self.cur + bytes.len()].copy_from_slice(bytes);
        self.cur += bytes.len();
        Ok(())
    }
}

impl Dest<'_, '_> {
    fn emit(&mut self, v: u64) -> Result<(), String> {
        match self {
            Dest::Block(out) => out.put(&v.to_le_bytes()),
            Dest::List(list, cap) => {
                if list.len() >= *cap {
                    return Err(format!("a value list is longer than its {cap} entries"));
                }
                list.push(v);
                Ok(())
            }
        }
    }
}

/// Runs the instructions of one block.
struct Vm<'s> {
    s: &'s [u8],
    pos: usize,
    last: u64,
    steps: u32,
}

impl Vm<'_> {
    fn byte(&mut self) -> Result<u8, String> {
        let b = *self
            .s
            .get(self.pos)
            .ok_or("the instructions end in the middle of the block")?;
        self.pos += 1;
        Ok(b)
    }

    fn uint(&mut self, n: u8) -> Result<u64, String> {
        if !matches!(n, 1 | 2 | 4 | 8) {
            return Err(format!("an operand of {n} bytes (1, 2, 4 or 8 allowed)"));
        }
        let n = n as usize;
        let bytes = self
            .s
            .get(self.pos..self.pos + n)
            .ok_or("the instructions end in the middle of the block")?;
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(bytes);
        self.pos += n;
        Ok(u64::from_le_bytes(b))
    }

    fn set(&mut self, dest: &mut Dest, v: u64) -> Result<(), String> {
        self.last = v;
        dest.emit(v)
    }

    fn step(&mut self, dest: &mut Dest, depth: u32) -> Result<(), String> {
        self.steps += 1;
        if self.steps > MAX_STEPS {
            return Err(format!("more than {MAX_STEPS} instructions for one block"));
        }
        let at = self.pos;
        let op = self.byte()?;
        let (hi, lo) = (op >> 4, op & 0x0f);
        match hi {
            0x0 => {
                let v = self.uint(lo)?;
                self.set(dest, v)
            }
            0x1 => self.set(dest, self.last.wrapping_add(lo as u64)),
            0x2 => {
                let d = self.uint(lo)?;
                self.set(dest, self.last.wrapping_add(d))
            }
            0x3 => self.set(dest, self.last.wrapping_sub(lo as u64)),
            0x4 => {
                let d = self.uint(lo)?;
                self.set(dest, self.last.wrapping_sub(d))
            }
            0x5 | 0x6 => {
                let n = if hi == 5 {
                    lo as usize
                } else {
                    ((lo as usize) << 8) | self.byte()? as usize
                };
                for _ in 0..n {
                    dest.emit(self.last)?;
                }
                Ok(())
            }
            0x7 | 0x8 => {
                let n = if hi == 7 {
                    lo as usize
                } else {
                    ((lo as usize) << 8) | self.byte()? as usize
                };
                if n == 0 {
                    return Err(format!("a repeat count of 0 (instruction at byte {at})"));
                }
                if depth >= MAX_DEPTH {
                    return Err(format!("repeats nested too deeply (at byte {at})"));
                }
                let start = self.pos;
                for _ in 0..n {
                    self.pos = start;
                    self.step(dest, depth + 1)?;
                }
                Ok(())
            }
            0xa => {
                let Dest::Block(out) = dest else {
                    return Err(format!("literal bytes inside a value list (at byte {at})"));
                };
                let n = self.uint(lo)?;
                if n > out.room() as u64 {
                    return Err(format!(
                        "{n} literal bytes do not fit in the block (at byte {at})"
                    ));
                }
                let n = n as usize;
                let bytes = self
                    .s
                    .get(self.pos..self.pos + n)
                    .ok_or("the instructions end in the middle of the block")?;
                self.pos += n;
                out.put(bytes)
            }
            0xb => {
                let n = ((lo as usize) << 8) | self.byte()? as usize;
                let Dest::Block(out) = dest else {
                    return Err(format!("a value pair list inside a list (at byte {at})"));
                };
                if n * 8 > out.room() {
                    return Err(format!("{n} values do not fit in the block (at byte {at})"));
                }
                let mut a = Vec::with_capacity(n);
                let mut b = Vec::with_capacity(n);
                for list in [&mut a, &mut b] {
                    while list.len() < n {
                        self.step(&mut Dest::List(list, n), depth + 1)?;
                    }
                }
                for (x, y) in a.into_iter().zip(b) {
                    out.put(&((x << 24) | y).to_le_bytes())?;
                }
                Ok(())
            }
            _ => Err(format!("unknown instruction {op:#04x} (at byte {at})")),
        }
    }
}

/// Run the instructions at `s[*pos..]` until `out` (one block) is full.
fn decode_block(s: &[u8], pos: &mut usize, out: &mut [u8]) -> Result<(), String> {
    let mut vm = Vm {
        s,
        pos: *pos,
        last: 0,
        steps: 0,
    };
    let mut bo = BlockOut { buf: out, cur: 0 };
    while bo.cur < bo.buf.len() {
        vm.step(&mut Dest::Block(&mut bo), 0)?;
    }
    *pos = vm.pos;
    Ok(())
}

/// Reads a pack: the header, then chunk by chunk.
pub struct PackReader<R: Read> {
    r: R,
    header: Header,
    /// Byte offset of the next chunk.
    offset: u64,
    /// The file's length, when known (to refuse absurd chunk lengths early).
    len: Option<u64>,
}

/// One decompressed chunk.
pub struct Chunk {
    /// Byte offset of the chunk in the pack (for messages).
    pub offset: u64,
    data: Vec<u8>,
    pos: usize,
    nr_blocks: u64,
}

fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

impl<R: Read> PackReader<R> {
    /// Read and check the header. `len` is the pack's size when known.
    pub fn new(mut r: R, len: Option<u64>) -> Result<Self, PackError> {
        let mut h = [0u8; HEADER_LEN];
        let got = read_full(&mut r, &mut h)?;
        if got >= 8 && le64(&h, 0) != MAGIC {
            return Err(PackError::NotAPack(le64(&h, 0)));
        }
        if got < HEADER_LEN {
            return Err(PackError::ShortHeader);
        }
        let version = le64(&h, 8);
        if version != VERSION {
            return Err(PackError::Version(version));
        }
        let block_size = le64(&h, 16);
        if block_size != BLOCK_SIZE as u64 {
            return Err(PackError::BlockSize(block_size));
        }
        let nr_blocks = le64(&h, 24);
        if !nr_blocks
            .checked_mul(block_size)
            .is_some_and(|b| b <= i64::MAX as u64)
        {
            return Err(PackError::TooManyBlocks(nr_blocks));
        }
        Ok(PackReader {
            r,
            header: Header {
                block_size,
                nr_blocks,
            },
            offset: HEADER_LEN as u64,
            len,
        })
    }

    pub fn header(&self) -> Header {
        self.header
    }

    /// The next chunk, decompressed, or None at the end of the pack.
    pub fn next_chunk(&mut self) -> Result<Option<Chunk>, PackError> {
        let offset = self.offset;
        let mut l = [0u8; 8];
        match read_full(&mut self.r, &mut l)? {
            0 => return Ok(None),
            8 => {}
            _ => {
                return Err(PackError::Truncated {
                    what: "chunk length",
                    offset,
                })
            }
        }
        let clen = u64::from_le_bytes(l);
        let limit = match self.len {
            Some(len) => len.saturating_sub(offset + 8),
            None => MAX_CHUNK,
        };
        if clen > limit {
            return Err(PackError::Truncated {
                what: "compressed chunk",
                offset,
            });
        }
        let mut data = vec![0u8; clen as usize];
        if read_full(&mut self.r, &mut data)? < data.len() {
            return Err(PackError::Truncated {
                what: "compressed chunk",
                offset,
            });
        }
        self.offset = offset + 8 + clen;
        let mut z = ZlibDecoder::new(&data[..]);
        let mut raw = Vec::new();
        let bad = |msg: String| PackError::Chunk { offset, msg };
        (&mut z)
            .take(MAX_RAW_CHUNK + 1)
            .read_to_end(&mut raw)
            .map_err(|e| bad(format!("zlib: {e}")))?;
        if raw.len() as u64 > MAX_RAW_CHUNK {
            return Err(bad(format!(
                "decompresses to more than {MAX_RAW_CHUNK} bytes"
            )));
        }
        if z.total_in() != clen {
            return Err(bad(format!(
                "{} bytes after the end of its zlib stream",
                clen - z.total_in()
            )));
        }
        Ok(Some(Chunk {
            offset,
            data: raw,
            pos: 0,
            nr_blocks: self.header.nr_blocks,
        }))
    }

    /// Visit every block of the pack: its index and its 4096 bytes, checked
    /// to lie inside the image and to carry a known metadata checksum.
    pub fn for_each_block<E: From<PackError>>(
        &mut self,
        mut f: impl FnMut(u64, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut buf = vec![0u8; BLOCK_SIZE];
        while let Some(mut chunk) = self.next_chunk()? {
            while let Some(index) = chunk.next_block(&mut buf)? {
                f(index, &buf)?;
            }
        }
        Ok(())
    }
}

impl Chunk {
    /// Decode the next block into `buf` (4096 bytes); its index, or None at
    /// the end of the chunk.
    pub fn next_block(&mut self, buf: &mut [u8]) -> Result<Option<u64>, PackError> {
        if self.pos == self.data.len() {
            return Ok(None);
        }
        let Some(ix) = self.data.get(self.pos..self.pos + 8) else {
            return Err(PackError::Chunk {
                offset: self.offset,
                msg: format!(
                    "ends in the middle of a block index (at byte {} of its {} decompressed bytes)",
                    self.pos,
                    self.data.len()
                ),
            });
        };
        let index = le64(ix, 0);
        self.pos += 8;
        if index >= self.nr_blocks {
            return Err(PackError::OutOfRange {
                block: index,
                offset: self.offset,
                nr_blocks: self.nr_blocks,
            });
        }
        decode_block(&self.data, &mut self.pos, buf).map_err(|msg| PackError::Block {
            block: index,
            offset: self.offset,
            msg,
        })?;
        if !is_packable(buf) {
            return Err(PackError::BadChecksum {
                block: index,
                offset: self.offset,
            });
        }
        Ok(Some(index))
    }
}

// ---------------------------------------------------------------------------
// Unpacking onto a file or device

/// A [`Read`] over a file from its start, by `pread` (the file's own
/// position is left alone).
pub struct FileReader<'f> {
    file: &'f File,
    pos: u64,
}

impl<'f> FileReader<'f> {
    pub fn new(file: &'f File) -> Self {
        FileReader { file, pos: 0 }
    }
}

impl Read for FileReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// A pack read through once and found sound.
#[derive(Debug)]
pub struct Validated {
    pub header: Header,
    /// Indexes of the blocks the pack holds, sorted, without duplicates.
    pub present: Vec<u64>,
}

/// Read the whole pack in `file` (`len` bytes) and check every block: the
/// header, every chunk, every block's instructions, index and checksum.
/// `progress` gets the bytes read so far and `len`.
pub fn validate(
    file: &File,
    len: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Validated, PackError> {
    let mut r = PackReader::new(io::BufReader::new(FileReader::new(file)), Some(len))?;
    let mut present = Vec::new();
    let mut buf = vec![0u8; BLOCK_SIZE];
    while let Some(mut chunk) = r.next_chunk()? {
        while let Some(index) = chunk.next_block(&mut buf)? {
            present.push(index);
        }
        progress(r.offset, len);
    }
    present.sort_unstable();
    present.dedup();
    Ok(Validated {
        header: r.header(),
        present,
    })
}

/// Why writing an unpacked image failed.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("{0}")]
    Pack(#[from] PackError),
    #[error(
        "Output file too small: it has {size} bytes, the unpacked image needs {needed} (nothing was written)"
    )]
    OutputTooSmall { size: u64, needed: u64 },
    #[error("writing block {block}: {source}")]
    Write {
        block: u64,
        #[source]
        source: io::Error,
    },
}

/// Zeros written per `pwrite` when clearing a block device.
const ZERO_RUN: u64 = 256;

/// Write the image packed in `file` (checked by [`validate`] into `v`) onto
/// `out`, `out_size` bytes, a regular file (`is_block_device` false: it is
/// cut to the image's size) or a block device (at least the image's size;
/// blocks the pack lacks are zeroed).
///
/// Crash safety: block 0 (the superblock) is cleared first and written
/// last, after a flush of everything else, so an interrupted unpack leaves
/// no valid superblock rather than one over half-written trees.
pub fn write_image(
    file: &File,
    len: u64,
    v: &Validated,
    out: &File,
    out_size: u64,
    is_block_device: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), UnpackError> {
    let needed = v.header.image_bytes();
    let bs = BLOCK_SIZE as u64;
    let werr = |block: u64| move |source: io::Error| UnpackError::Write { block, source };
    if is_block_device {
        if out_size < needed {
            return Err(UnpackError::OutputTooSmall {
                size: out_size,
                needed,
            });
        }
        if v.header.nr_blocks > 0 {
            super::io::write_at(out, &[0u8; BLOCK_SIZE], 0).map_err(werr(0))?;
            super::io::sync_data(out).map_err(werr(0))?;
        }
        // Zero the blocks the pack does not hold (block 0 is done).
        let zeros = vec![0u8; (ZERO_RUN * bs) as usize];
        let mut next = 1u64;
        for &p in v.present.iter().chain(std::iter::once(&v.header.nr_blocks)) {
            while next < p {
                let n = (p - next).min(ZERO_RUN);
                super::io::write_at(out, &zeros[..(n * bs) as usize], next * bs)
                    .map_err(werr(next))?;
                next += n;
            }
            next = next.max(p + 1);
        }
    } else {
        // Cut to nothing, then grow: every block reads as zeros.
        super::io::set_len(out, 0).map_err(werr(0))?;
        super::io::set_len(out, needed).map_err(werr(0))?;
    }
    let mut r = PackReader::new(io::BufReader::new(FileReader::new(file)), Some(len))?;
    let mut buf = vec![0u8; BLOCK_SIZE];
    let mut superblock: Option<Vec<u8>> = None;
    while let Some(mut chunk) = r.next_chunk()? {
        while let Some(index) = chunk.next_block(&mut buf)? {
            if index == 0 {
                superblock = Some(buf.clone());
            } else {
                super::io::write_at(out, &buf, index * bs).map_err(werr(index))?;
            }
        }
        progress(r.offset, len);
    }
    super::io::sync_all(out).map_err(werr(0))?;
    if let Some(sb) = superblock {
        super::io::write_at(out, &sb, 0).map_err(werr(0))?;
        super::io::sync_all(out).map_err(werr(0))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdata::checksum::{seal, BlockKind};

    fn node(leaf: bool, vsize: usize, keys: &[u64], vals: &[u64]) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK_SIZE];
        let max = (4064 / (8 + vsize)) / 3 * 3;
        b[4..8].copy_from_slice(&(if leaf { 2u32 } else { 1 }).to_le_bytes());
        b[8..16].copy_from_slice(&1u64.to_le_bytes());
        b[16..20].copy_from_slice(&(keys.len() as u32).to_le_bytes());
        b[20..24].copy_from_slice(&(max as u32).to_le_bytes());
        b[24..28].copy_from_slice(&(vsize as u32).to_le_bytes());
        for (i, k) in keys.iter().enumerate() {
            b[32 + 8 * i..40 + 8 * i].copy_from_slice(&k.to_le_bytes());
        }
        for (i, v) in vals.iter().enumerate() {
            let o = 32 + 8 * max + vsize * i;
            b[o..o + 8].copy_from_slice(&v.to_le_bytes());
        }
        seal(&mut b, BlockKind::BTreeNode);
        b
    }

    fn round_trip(block: &[u8]) -> Vec<u8> {
        let mut s = Vec::new();
        encode_block(block, &mut s);
        let mut out = vec![0u8; BLOCK_SIZE];
        let mut pos = 0;
        decode_block(&s, &mut pos, &mut out).unwrap();
        assert_eq!(pos, s.len(), "the whole stream is used");
        assert_eq!(out, block);
        s
    }

    #[test]
    fn known_instruction_streams_decode() {
        // A leaf of 252 slots, keys 5 and 6, mapping values (7 << 24 | 3)
        // and (8 << 24 | 4); the stream the original packer writes for it.
        let block = node(true, 8, &[5, 6], &[(7 << 24) | 3, (8 << 24) | 4]);
        let mut s = vec![0xa1, 0x20];
        s.extend_from_slice(&block[..32]);
        s.extend_from_slice(&[0x01, 0x05, 0x11, 0x36, 0x60, 0xf9, 0xb0, 0xfc]);
        s.extend_from_slice(&[0x01, 0x07, 0x11, 0x38, 0x60, 0xf9]);
        s.extend_from_slice(&[0x01, 0x03, 0x11, 0x34, 0x60, 0xf9, 0xa1, 0x20]);
        s.extend_from_slice(&[0u8; 32]);
        let mut out = vec![0u8; BLOCK_SIZE];
        let mut pos = 0;
        decode_block(&s, &mut pos, &mut out).unwrap();
        assert_eq!(pos, s.len());
        assert_eq!(out, block);
        // Our encoder writes the very same stream for it.
        assert_eq!(round_trip(&block), s);
    }

    #[test]
    fn repeats_and_wide_deltas() {
        // 0, 7 x (+1), 1000, -1000, then 5 x 0 (runs), 8-byte literal.
        let mut s = vec![
            0x01, 0x00, 0x77, 0x11, 0x22, 0xe8, 0x03, 0x42, 0xe8, 0x03, 0x55,
        ];
        s.push(0x08);
        s.extend_from_slice(&u64::MAX.to_le_bytes());
        let mut out = vec![0u8; 16 * 8];
        let mut pos = 0;
        decode_block(&s, &mut pos, &mut out).unwrap();
        let vals: Vec<u64> = out.chunks(8).map(|c| le64(c, 0)).collect();
        assert_eq!(
            vals,
            [0, 1, 2, 3, 4, 5, 6, 7, 1007, 7, 7, 7, 7, 7, 7, u64::MAX]
        );
    }

    #[test]
    fn nodes_round_trip() {
        let seq: Vec<u64> = (0..252).collect();
        let big: Vec<u64> = (0..252).map(|i| u64::MAX - i * 977).collect();
        let mixed: Vec<u64> = (0..100).map(|i| (i * i * 31) % 1000).collect();
        round_trip(&node(true, 8, &[], &[]));
        round_trip(&node(true, 8, &seq, &big));
        round_trip(&node(false, 8, &seq, &mixed));
        round_trip(&node(true, 8, &mixed, &seq));
        let down: Vec<u64> = (0..252).rev().map(|i| i * 70_000).collect();
        round_trip(&node(true, 8, &down, &down));
        let runs: Vec<u64> = (0..252).map(|i| i / 40).collect();
        round_trip(&node(true, 8, &runs, &runs));
        round_trip(&node(true, 24, &seq[..126], &mixed));
        round_trip(&node(true, 4, &mixed, &[]));
        // Not a node: stored literally.
        let mut sb = vec![0u8; BLOCK_SIZE];
        sb[100] = 1;
        seal(&mut sb, BlockKind::ThinSuperblock);
        let s = round_trip(&sb);
        assert_eq!(&s[..3], &[0xa2, 0x00, 0x10]);
    }

    #[test]
    fn bad_streams_are_errors() {
        let mut out = vec![0u8; BLOCK_SIZE];
        for s in [
            &[0x90u8][..],             // unsupported
            &[0xc0],                   // unknown
            &[0xa0],                   // literal with a 0-byte length
            &[0x09, 1, 2],             // 9-byte operand
            &[0x03, 1, 2, 3],          // 3-byte operand
            &[0x01],                   // ends early
            &[0x70, 0x11],             // repeat 0
            &[0x8f, 0xff, 0x50],       // emits nothing, forever
            &[0xa2, 0x01, 0x10],       // more literal bytes than the block
            &[0x01, 0x00, 0x6f, 0xff], // too many values
            &[0x7f, 0x7f, 0x7f, 0x7f, 0x7f, 0x11],
        ] {
            let mut pos = 0;
            assert!(decode_block(s, &mut pos, &mut out).is_err(), "{s:02x?}");
        }
    }

    #[test]
    fn writer_then_reader() {
        let blocks: Vec<Vec<u8>> = (0..300u64)
            .map(|i| node(true, 8, &[i], &[(i << 24) | 1]))
            .collect();
        let mut pw = PackWriter::new(Vec::new(), 1000).unwrap();
        for (i, b) in blocks.iter().enumerate() {
            pw.add(i as u64 * 3, b).unwrap();
        }
        let (bytes, n) = pw.finish().unwrap();
        assert_eq!(n, 300);
        let len = bytes.len() as u64;
        let mut r = PackReader::new(&bytes[..], Some(len)).unwrap();
        assert_eq!(
            r.header(),
            Header {
                block_size: 4096,
                nr_blocks: 1000
            }
        );
        let mut seen = 0;
        r.for_each_block(|ix, b| -> Result<(), PackError> {
            assert_eq!(ix, seen as u64 * 3);
            assert_eq!(b, &blocks[seen][..]);
            seen += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, 300);
        // Every truncation is an error, never a panic.
        for cut in [0, 7, 31, 33, 39, 41, bytes.len() / 2, bytes.len() - 1] {
            let mut r = match PackReader::new(&bytes[..cut], Some(cut as u64)) {
                Ok(r) => r,
                Err(_) => continue,
            };
            assert!(r
                .for_each_block(|_, _| -> Result<(), PackError> { Ok(()) })
                .is_err());
        }
    }
}
