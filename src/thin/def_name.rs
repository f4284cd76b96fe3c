//! Names of `<def>`s (shared runs of mappings in a dump), as keys.
//!
//! A big dump has hundreds of thousands of defs and refs, and both the XML
//! reader (which checks each ref) and the pool builder (which splices the
//! def's leaves in) look every ref up by name. A dump's names are short
//! numbers, so a [`DefName`] keeps a short name inline: a lookup compares it
//! inside the hash table's own slot instead of following a pointer to a
//! `String` (a cache miss per probe), and making one allocates nothing.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};

/// Bytes of a name kept inline.
const INLINE: usize = 30;

/// A def's name; short ones inline (32 bytes in all).
#[derive(Clone)]
pub enum DefName {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Box<str>),
}

impl DefName {
    pub fn new(name: &str) -> DefName {
        let mut bytes = [0u8; INLINE];
        match bytes.get_mut(..name.len()) {
            Some(b) => {
                b.copy_from_slice(name.as_bytes());
                DefName::Inline {
                    len: name.len() as u8,
                    bytes,
                }
            }
            None => DefName::Heap(name.into()),
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            DefName::Inline { len, bytes } => &bytes[..*len as usize],
            DefName::Heap(s) => s.as_bytes(),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            // A whole &str was copied in, so this cannot fail.
            DefName::Inline { .. } => std::str::from_utf8(self.as_bytes()).unwrap_or_default(),
            DefName::Heap(s) => s,
        }
    }
}

impl PartialEq for DefName {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for DefName {}

// Hashed and compared as its bytes, so a map keyed by DefName is searched
// with a plain `&[u8]` (`name.as_bytes()`), without making a key.
impl Hash for DefName {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state)
    }
}

impl Borrow<[u8]> for DefName {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl std::fmt::Debug for DefName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

/// A fast hasher for def names, eight bytes at a time. Not keyed: a
/// hostile dump could make names collide, which slows a restore down and
/// does no other harm.
#[derive(Default, Clone, Copy)]
pub struct NameHasher(u64);

impl NameHasher {
    #[inline]
    fn add(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl Hasher for NameHasher {
    fn finish(&self) -> u64 {
        // The multiply leaves its best bits high; the table indexes by the
        // low ones.
        self.0 ^ (self.0 >> 29)
    }
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().unwrap_or_default()));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut v = [0u8; 8];
            v[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(v));
        }
    }
    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
}

/// A map from def names.
///
/// A dump names its defs 0, 1, 2, ... and its refs mostly follow the
/// order of the defs: names that are such numbers index a vector (refs then
/// read it nearly in order, where a hash table costs a cache miss or two
/// per ref); any other name goes to a hash table.
pub struct DefMap<V> {
    numbered: Vec<Option<V>>,
    named: HashMap<DefName, V, BuildHasherDefault<NameHasher>>,
    len: usize,
}

impl<V> Default for DefMap<V> {
    fn default() -> Self {
        DefMap {
            numbered: Vec::new(),
            named: HashMap::default(),
            len: 0,
        }
    }
}

/// The number a name spells in canonical decimal ("0", "17"; not "017",
/// "+1" or "1e3"), below 10^9.
fn number(name: &[u8]) -> Option<usize> {
    if name.is_empty() || name.len() > 9 || (name[0] == b'0' && name.len() > 1) {
        return None;
    }
    name.iter().try_fold(0usize, |n, &c| {
        c.is_ascii_digit().then(|| n * 10 + (c - b'0') as usize)
    })
}

impl<V> DefMap<V> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, name: &[u8]) -> Option<&V> {
        if let Some(n) = number(name) {
            if let Some(Some(v)) = self.numbered.get(n) {
                return Some(v);
            }
        }
        // (A number too big for the vector when it was added is here.)
        self.named.get(name)
    }

    pub fn contains_key(&self, name: &[u8]) -> bool {
        self.get(name).is_some()
    }

    /// Add `name`; a name already present keeps its value and that is an
    /// error (Err holds the new value back).
    pub fn insert(&mut self, name: &str, v: V) -> Result<(), V> {
        if self.contains_key(name.as_bytes()) {
            return Err(v);
        }
        // The vector grows only in step with the number of defs, so a
        // huge number in a small dump costs no memory.
        match number(name.as_bytes()) {
            Some(n) if n < 4 * self.len + 4096 => {
                if n >= self.numbered.len() {
                    self.numbered.resize_with(n + 1, || None);
                }
                self.numbered[n] = Some(v);
            }
            _ => {
                self.named.insert(DefName::new(name), v);
            }
        }
        self.len += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_long_names_are_found_by_their_bytes() {
        let long = "d".repeat(INLINE + 1);
        let mut names: Vec<String> = ["", "1", "114250", &"x".repeat(INLINE), &long, "é"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        // Numbers in and out of the vector, and look-alikes.
        for n in [
            "0",
            "2",
            "017",
            "+3",
            "4e1",
            "999999999",
            "1000000000",
            "5000",
        ] {
            names.push(n.to_string());
        }
        names.extend((10..3000).map(|i| i.to_string()));
        let mut m: DefMap<usize> = DefMap::default();
        for (i, n) in names.iter().enumerate() {
            assert!(m.insert(n, i).is_ok(), "{n}");
            assert_eq!(m.insert(n, 0), Err(0), "{n} again");
        }
        assert_eq!(m.len(), names.len());
        // "5000" came too early for the vector; 10..3000 are in it.
        assert_eq!(m.numbered.len(), 3000);
        assert!(m.named.contains_key("5000".as_bytes()));
        for (i, n) in names.iter().enumerate() {
            assert_eq!(m.get(n.as_bytes()), Some(&i), "{n}");
            assert_eq!(DefName::new(n).as_str(), *n);
        }
        for n in ["3", "9", "3000", "00", "017 ", "1000000001"] {
            assert_eq!(m.get(n.as_bytes()), None, "{n}");
        }
        assert!(matches!(DefName::new(&long), DefName::Heap(_)));
        assert!(matches!(
            DefName::new(&"x".repeat(INLINE)),
            DefName::Inline { .. }
        ));
        // Names differing only past the first eight bytes, or in length.
        let mut h: HashMap<DefName, u32, BuildHasherDefault<NameHasher>> = HashMap::default();
        h.insert(DefName::new("12345678a"), 1);
        h.insert(DefName::new("1142500"), 2);
        for n in ["11425", "114250", "12345678b", "12345678", "x"] {
            assert_eq!(h.get(n.as_bytes()), None, "{n}");
        }
        assert_eq!(h.get("12345678a".as_bytes()), Some(&1));
        assert_eq!(std::mem::size_of::<DefName>(), 32);
    }
}
