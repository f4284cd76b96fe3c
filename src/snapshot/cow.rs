//! The dm-snapshot persistent exception store, as the kernel writes it.
//!
//! The device is divided into chunks of `chunk_size` sectors (a power of
//! two). Chunk 0 holds the header; chunk 1 is metadata area 0; each metadata
//! area is followed by the data chunks it describes, one per record, so area
//! `a` lives at chunk `1 + (epa + 1) * a`, where `epa` (exceptions per area)
//! is `chunk bytes / 16`. A record is `old_chunk` (origin chunk) and
//! `new_chunk` (COW chunk holding the snapshot's copy), both little-endian
//! u64. Scanning areas in order, the first record whose `new_chunk` is 0
//! ends the table (chunk 0 is the header, never a data chunk); an area with
//! no such record is full and the table continues in the next area.
//!
//! [`Area`] is a zero-copy view over one area's bytes; [`CowStore::scan`]
//! reads the areas in order and hands each view to a visitor, so dump, check
//! and merge read the metadata once and keep nothing per exception unless
//! they need to.

use super::dev::Store;
use super::{Error, HeaderProblem};

/// `"SnAp"` read as a little-endian u32.
pub const SNAP_MAGIC: u32 = 0x7041_6e53;
/// The only on-disk version.
pub const DISK_VERSION: u32 = 1;
pub const SECTOR_SIZE: u64 = 512;
/// Bytes per exception record.
pub const RECORD_SIZE: usize = 16;
/// The kernel refuses chunk sizes above `INT_MAX >> SECTOR_SHIFT` sectors.
pub const MAX_CHUNK_SECTORS: u32 = (i32::MAX as u32) >> 9;
/// Bytes of the header that carry fields (the rest of chunk 0 is zero).
pub const HEADER_SIZE: usize = 16;

/// The header fields (chunk 0, bytes 0..16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub magic: u32,
    /// Non-zero while the snapshot is usable; the kernel writes 0 when it
    /// invalidates the snapshot (overflow, I/O error).
    pub valid: u32,
    pub version: u32,
    /// Chunk size in 512-byte sectors.
    pub chunk_sectors: u32,
}

impl Header {
    pub fn parse(bytes: &[u8]) -> Header {
        let word = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
        Header {
            magic: word(0),
            valid: word(4),
            version: word(8),
            chunk_sectors: word(12),
        }
    }

    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(&self.magic.to_le_bytes());
        b[4..8].copy_from_slice(&self.valid.to_le_bytes());
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.chunk_sectors.to_le_bytes());
        b
    }

    /// A valid version-1 header for `chunk_sectors`.
    pub fn new(chunk_sectors: u32) -> Header {
        Header {
            magic: SNAP_MAGIC,
            valid: 1,
            version: DISK_VERSION,
            chunk_sectors,
        }
    }

    /// The checks the kernel makes before it uses a store.
    pub fn validate(&self) -> Result<(), HeaderProblem> {
        if self.magic == 0 {
            return Err(HeaderProblem::Unformatted);
        }
        if self.magic != SNAP_MAGIC {
            return Err(HeaderProblem::BadMagic(self.magic));
        }
        if self.version != DISK_VERSION {
            return Err(HeaderProblem::BadVersion(self.version));
        }
        if !self.chunk_sectors.is_power_of_two() {
            return Err(HeaderProblem::BadChunkSize(self.chunk_sectors));
        }
        if self.chunk_sectors > MAX_CHUNK_SECTORS {
            return Err(HeaderProblem::ChunkSizeTooLarge(self.chunk_sectors));
        }
        Ok(())
    }

    pub fn is_valid(&self) -> bool {
        self.valid != 0
    }
}

/// Where things are on a COW device of a given size and chunk size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub chunk_sectors: u32,
    pub chunk_bytes: u64,
    /// Exceptions per area: records in one metadata chunk.
    pub epa: u64,
    /// Device size in bytes.
    pub cow_bytes: u64,
    /// Whole chunks on the device (a trailing partial chunk is unusable).
    pub nr_chunks: u64,
}

impl Layout {
    pub fn new(chunk_sectors: u32, cow_bytes: u64) -> Layout {
        let chunk_bytes = chunk_sectors as u64 * SECTOR_SIZE;
        Layout {
            chunk_sectors,
            chunk_bytes,
            epa: chunk_bytes / RECORD_SIZE as u64,
            cow_bytes,
            nr_chunks: cow_bytes / chunk_bytes,
        }
    }

    /// Distance between two metadata areas, in chunks.
    pub fn stride(&self) -> u64 {
        self.epa + 1
    }

    /// The chunk holding metadata area `area`. Saturates instead of wrapping,
    /// so a huge index simply lies past the end of any device.
    pub fn area_chunk(&self, area: u64) -> u64 {
        area.saturating_mul(self.stride()).saturating_add(1)
    }

    /// The metadata area stored in `chunk`, if `chunk` is one.
    pub fn area_at(&self, chunk: u64) -> Option<u64> {
        (chunk >= 1 && (chunk - 1) % self.stride() == 0).then(|| (chunk - 1) / self.stride())
    }

    /// The first data chunk described by `area`.
    pub fn first_data_chunk(&self, area: u64) -> u64 {
        self.area_chunk(area).saturating_add(1)
    }

    /// Metadata areas that fit on the device.
    pub fn nr_areas(&self) -> u64 {
        if self.nr_chunks < 2 {
            0
        } else {
            (self.nr_chunks - 2) / self.stride() + 1
        }
    }

    /// Byte offset of `chunk`, `None` on overflow.
    pub fn chunk_offset(&self, chunk: u64) -> Option<u64> {
        chunk.checked_mul(self.chunk_bytes)
    }

    /// Data chunks the device can hold at most (every chunk but the header
    /// and the metadata areas).
    pub fn data_capacity(&self) -> u64 {
        self.nr_chunks.saturating_sub(1 + self.nr_areas())
    }
}

/// One exception: origin chunk `old` is stored in COW chunk `new`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Exception {
    pub old: u64,
    pub new: u64,
}

impl Exception {
    /// True when `next` continues this one's run (both chunks one higher).
    pub fn precedes(&self, next: &Exception) -> bool {
        self.old.checked_add(1) == Some(next.old) && self.new.checked_add(1) == Some(next.new)
    }
}

/// A zero-copy view of one metadata area (one chunk of records).
#[derive(Clone, Copy)]
pub struct Area<'a> {
    bytes: &'a [u8],
}

impl<'a> Area<'a> {
    /// `bytes` is the whole area chunk (a multiple of 16 bytes).
    pub fn new(bytes: &'a [u8]) -> Area<'a> {
        Area { bytes }
    }

    /// Records the area can hold (exceptions per area).
    pub fn capacity(&self) -> usize {
        self.bytes.len() / RECORD_SIZE
    }

    /// Record `i` (`i < capacity()`), whether in use or not.
    pub fn record(&self, i: usize) -> Exception {
        let b = &self.bytes[i * RECORD_SIZE..(i + 1) * RECORD_SIZE];
        Exception {
            old: u64::from_le_bytes(b[0..8].try_into().unwrap()),
            new: u64::from_le_bytes(b[8..16].try_into().unwrap()),
        }
    }

    /// Records in use: those before the first record with `new == 0`
    /// (the end of the table), or all of them when the area is full.
    pub fn used(&self) -> usize {
        self.bytes
            .chunks_exact(RECORD_SIZE)
            .position(|r| r[8..16] == [0u8; 8])
            .unwrap_or(self.capacity())
    }

    /// The exceptions in use, in table order.
    pub fn exceptions(&self) -> impl Iterator<Item = Exception> + 'a {
        let area = *self;
        (0..area.used()).map(move |i| area.record(i))
    }

    /// Length of the run of consecutive exceptions that ends with record
    /// `end - 1`, counting backwards (the kernel's merge unit): records
    /// `end - len .. end` have old and new chunks each increasing by one.
    pub fn run_ending_at(&self, end: usize) -> usize {
        if end == 0 {
            return 0;
        }
        let mut len = 1;
        let mut next = self.record(end - 1);
        while len < end {
            let prev = self.record(end - 1 - len);
            if !prev.precedes(&next) {
                break;
            }
            next = prev;
            len += 1;
        }
        len
    }
}

/// Write exception `e` as record `i` of an area's bytes.
pub fn put_record(area: &mut [u8], i: usize, e: Exception) {
    let b = &mut area[i * RECORD_SIZE..(i + 1) * RECORD_SIZE];
    b[0..8].copy_from_slice(&e.old.to_le_bytes());
    b[8..16].copy_from_slice(&e.new.to_le_bytes());
}

/// One metadata area as scanned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AreaInfo {
    pub index: u64,
    pub chunk: u64,
    /// Records in use.
    pub used: u64,
}

/// The exception table's shape, from a scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// The areas read, in order; the last one is where the table ends
    /// (it is not full, or it is the truncated case below).
    pub areas: Vec<AreaInfo>,
    pub exceptions: u64,
    /// Highest COW chunk in use.
    pub max_new: Option<u64>,
    /// The last area read is full, but the next area, which must hold the
    /// end of the table, lies past the end of the device (index given).
    pub truncated_at: Option<u64>,
}

/// Space accounting as the kernel's status line reports it
/// (`<allocated>/<total> <metadata>`, in sectors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub allocated_sectors: u64,
    pub total_sectors: u64,
    pub metadata_sectors: u64,
}

impl Table {
    /// The area the kernel would append to next (where the table ends).
    pub fn current_area(&self) -> u64 {
        match self.truncated_at {
            Some(a) => a,
            None => self.areas.last().map_or(0, |a| a.index),
        }
    }

    /// The kernel's next free chunk after loading this table: one past the
    /// highest chunk in use (at least 2), moved past a metadata area.
    pub fn next_free(&self, layout: &Layout) -> u64 {
        let mut next = self.max_new.map_or(2, |m| m.saturating_add(1).max(2));
        if next % layout.stride() == 1 {
            next += 1;
        }
        next
    }

    pub fn usage(&self, layout: &Layout) -> Usage {
        let cs = layout.chunk_sectors as u64;
        Usage {
            allocated_sectors: self.next_free(layout).saturating_mul(cs),
            total_sectors: layout.cow_bytes / SECTOR_SIZE,
            metadata_sectors: (self.current_area() + 2).saturating_mul(cs),
        }
    }
}

/// An opened store: the header has been validated, the areas not yet read.
pub struct CowStore<'d, S: Store + ?Sized> {
    dev: &'d S,
    name: String,
    header: Header,
    layout: Layout,
}

impl<'d, S: Store + ?Sized> CowStore<'d, S> {
    /// Read and validate the header of the store on `dev` (`name` is how
    /// errors refer to it). An invalidated store (valid = 0) opens; callers
    /// decide whether to refuse it.
    pub fn open(dev: &'d S, name: &str) -> Result<Self, Error> {
        let size = dev.size();
        let too_small = |need: u64| Error::TooSmall {
            device: name.to_string(),
            size,
            need,
        };
        if size < HEADER_SIZE as u64 {
            return Err(too_small(2 * SECTOR_SIZE));
        }
        let mut hb = [0u8; HEADER_SIZE];
        dev.read_at(&mut hb, 0)
            .map_err(|e| Error::io(name, "reading the header (chunk 0)", e))?;
        let header = Header::parse(&hb);
        header.validate().map_err(|problem| Error::Header {
            device: name.to_string(),
            problem,
        })?;
        let layout = Layout::new(header.chunk_sectors, size);
        if layout.nr_chunks < 2 {
            return Err(too_small(2 * layout.chunk_bytes));
        }
        Ok(CowStore {
            dev,
            name: name.to_string(),
            header,
            layout,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dev(&self) -> &'d S {
        self.dev
    }

    /// Read metadata area `area` into `buf` (one chunk).
    pub fn read_area(&self, area: u64, buf: &mut [u8]) -> Result<(), Error> {
        let chunk = self.layout.area_chunk(area);
        if chunk >= self.layout.nr_chunks {
            return Err(Error::AreaTruncated {
                device: self.name.clone(),
                area,
                chunk,
                nr_chunks: self.layout.nr_chunks,
            });
        }
        self.dev
            .read_at(buf, chunk * self.layout.chunk_bytes)
            .map_err(|e| {
                Error::io(
                    &self.name,
                    format!("reading metadata area {area} (chunk {chunk})"),
                    e,
                )
            })
    }

    /// A buffer for one area.
    pub fn area_buffer(&self) -> Vec<u8> {
        vec![0u8; self.layout.chunk_bytes as usize]
    }

    /// Read the table: every area up to the end of the table, in order,
    /// each handed to `visit` as a view before the next is read.
    pub fn scan<F>(&self, mut visit: F) -> Result<Table, Error>
    where
        F: FnMut(&AreaInfo, &Area<'_>) -> Result<(), Error>,
    {
        let mut buf = self.area_buffer();
        let mut table = Table {
            areas: Vec::new(),
            exceptions: 0,
            max_new: None,
            truncated_at: None,
        };
        let mut index = 0u64;
        loop {
            let chunk = self.layout.area_chunk(index);
            if index > 0 && chunk >= self.layout.nr_chunks {
                // The previous area is full and this one cannot be read.
                table.truncated_at = Some(index);
                break;
            }
            self.read_area(index, &mut buf)?;
            let area = Area::new(&buf);
            let used = area.used();
            let info = AreaInfo {
                index,
                chunk,
                used: used as u64,
            };
            for e in area.exceptions() {
                table.max_new = Some(table.max_new.map_or(e.new, |m| m.max(e.new)));
            }
            table.exceptions += used as u64;
            visit(&info, &area)?;
            table.areas.push(info);
            if used < area.capacity() {
                break;
            }
            index += 1;
        }
        Ok(table)
    }

    /// Like [`CowStore::scan`], but a table that runs past the end of the
    /// device is an error (the kernel cannot load it).
    pub fn scan_complete<F>(&self, visit: F) -> Result<Table, Error>
    where
        F: FnMut(&AreaInfo, &Area<'_>) -> Result<(), Error>,
    {
        let table = self.scan(visit)?;
        if let Some(area) = table.truncated_at {
            return Err(Error::AreaTruncated {
                device: self.name.clone(),
                area,
                chunk: self.layout.area_chunk(area),
                nr_chunks: self.layout.nr_chunks,
            });
        }
        Ok(table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_places_areas_between_their_data_chunks() {
        // 8 KiB chunks: 512 records per area.
        let l = Layout::new(16, 16 << 20);
        assert_eq!(l.epa, 512);
        assert_eq!(l.nr_chunks, 2048);
        assert_eq!(l.area_chunk(0), 1);
        assert_eq!(l.area_chunk(1), 514);
        assert_eq!(l.area_at(1), Some(0));
        assert_eq!(l.area_at(514), Some(1));
        assert_eq!(l.area_at(513), None);
        assert_eq!(l.area_at(0), None);
        // areas at 1, 514, 1027, 1540 fit in 2048 chunks
        assert_eq!(l.nr_areas(), 4);
        assert_eq!(l.data_capacity(), 2048 - 5);
    }

    #[test]
    fn header_rules() {
        assert!(Header::new(16).validate().is_ok());
        let mut h = Header::new(24);
        assert_eq!(h.validate(), Err(HeaderProblem::BadChunkSize(24)));
        h.chunk_sectors = 0;
        assert_eq!(h.validate(), Err(HeaderProblem::BadChunkSize(0)));
        h = Header::new(1 << 22);
        assert_eq!(h.validate(), Err(HeaderProblem::ChunkSizeTooLarge(1 << 22)));
        h = Header::new(16);
        h.version = 2;
        assert_eq!(h.validate(), Err(HeaderProblem::BadVersion(2)));
        h = Header::new(16);
        h.magic = 0;
        assert_eq!(h.validate(), Err(HeaderProblem::Unformatted));
        assert_eq!(Header::parse(&Header::new(16).to_bytes()), Header::new(16));
        assert_eq!(&Header::new(16).to_bytes()[0..4], b"SnAp");
    }

    #[test]
    fn area_view_ends_at_new_chunk_zero_and_finds_runs() {
        let mut b = vec![0u8; 512];
        let recs = [(0, 2), (1, 3), (2, 4), (9, 5), (0, 6), (1, 7)];
        for (i, &(old, new)) in recs.iter().enumerate() {
            put_record(&mut b, i, Exception { old, new });
        }
        // old_chunk 0 is legitimate; new_chunk 0 ends the table.
        put_record(&mut b, 7, Exception { old: 5, new: 9 });
        let a = Area::new(&b);
        assert_eq!(a.capacity(), 32);
        assert_eq!(a.used(), 6);
        assert_eq!(a.run_ending_at(6), 2);
        assert_eq!(a.run_ending_at(4), 1);
        assert_eq!(a.run_ending_at(3), 3);
        assert_eq!(a.run_ending_at(0), 0);
    }

    #[test]
    fn usage_follows_the_kernel_status() {
        let l = Layout::new(16, 16 << 20);
        let t = Table {
            areas: vec![AreaInfo {
                index: 0,
                chunk: 1,
                used: 114,
            }],
            exceptions: 114,
            max_new: Some(115),
            truncated_at: None,
        };
        // "snapshot 1856/32768 32" for this store
        assert_eq!(
            t.usage(&l),
            Usage {
                allocated_sectors: 1856,
                total_sectors: 32768,
                metadata_sectors: 32
            }
        );
        let empty = Table {
            areas: vec![],
            exceptions: 0,
            max_new: None,
            truncated_at: None,
        };
        assert_eq!(empty.next_free(&l), 2);
        // the chunk after the last data chunk of area 0 is area 1: skipped
        let full = Table {
            max_new: Some(513),
            ..empty
        };
        assert_eq!(full.next_free(&l), 515);
    }
}
