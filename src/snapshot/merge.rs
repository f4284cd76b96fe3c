//! `snapshot-merge` offline: copy every exception's chunk from the COW store
//! back to the origin, in the kernel's order and with the kernel's commits,
//! so that an interrupted merge can be resumed (by this tool or by the
//! kernel) and ends with exactly the kernel's result.
//!
//! Order: last exception first. The last area in use is worked from its
//! last record backwards; each step takes the run of records ending there
//! whose old and new chunks both go down by one per record (the kernel's
//! `prepare_merge`), then moves to the previous area when this one is empty.
//!
//! Commit, per run (the kernel's `merge_callback` + `commit_merge`):
//! 1. copy the run's chunks from the COW to the origin (large reads and
//!    writes; the origin's last chunk is clipped at the origin's end);
//! 2. flush the origin;
//! 3. zero the run's records (old = new = 0) in the area;
//! 4. write the area's changed sectors and flush the COW.
//!
//! The on-disk table is the whole state: zeroing trailing records moves the
//! end of the table back over exactly what is merged, and a crash at any
//! point leaves a table that still lists every chunk not known to be safely
//! on the origin. Copying a chunk again is harmless (the COW's data chunks
//! are never written), so a rerun simply continues.
//!
//! Nothing is written before the whole table has been read and checked:
//! a bad header, an invalid store, a truncated table, duplicate or
//! out-of-range exceptions, or an origin too small for an exception stop
//! the merge with the devices untouched.

use std::cell::Cell;
use std::io;

use super::check::{self, Finding, Kind};
use super::cow::{put_record, Area, CowStore, Exception, Layout, RECORD_SIZE};
use super::dev::Store;
use super::Error;

/// Merge options.
#[derive(Debug, Clone)]
pub struct Options {
    /// Only report the steps; open nothing for writing, write nothing.
    pub dry_run: bool,
    /// The largest single read or write when copying a run (bytes, at
    /// least 4096; a run's pieces need not be whole chunks).
    pub io_size: usize,
    /// Test hook: the write after this many writes (to either device) fails
    /// as an I/O error, and the merge stops there, as a crash or a failing
    /// disk would stop it. `None` in normal use.
    #[doc(hidden)]
    pub fail_after_writes: Option<u64>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            dry_run: false,
            io_size: 8 << 20,
            fail_after_writes: None,
        }
    }
}

/// One merge step: a run of exceptions, copied and committed together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub area: u64,
    /// The run's first record within the area.
    pub first_record: u64,
    /// Origin chunk of the run's first record.
    pub old: u64,
    /// COW chunk of the run's first record.
    pub new: u64,
    /// Chunks in the run.
    pub len: u64,
    /// Bytes copied (less than `len` chunks when clipped at the origin's end).
    pub bytes: u64,
}

/// What a merge did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    pub steps: u64,
    pub exceptions: u64,
    pub bytes: u64,
    /// Non-fatal remarks (an out-of-order table, a clipped last chunk).
    pub notes: Vec<String>,
}

/// Counts writes for the test hook.
struct Budget(Cell<Option<u64>>);

impl Budget {
    fn spend(&self) -> io::Result<()> {
        if let Some(left) = self.0.get() {
            if left == 0 {
                return Err(io::Error::other(
                    "injected failure: the test's write budget is spent",
                ));
            }
            self.0.set(Some(left - 1));
        }
        Ok(())
    }
}

/// Check that the store can be merged into an origin of `origin_bytes`;
/// returns the notes to report. Reads only.
pub fn validate<S: Store + ?Sized>(
    store: &CowStore<'_, S>,
    origin_bytes: u64,
) -> Result<(check::Report, Vec<String>), Error> {
    let device = store.name().to_string();
    if !store.header().is_valid() {
        return Err(Error::Invalid { device });
    }
    let report = check::check(store, Some(origin_bytes))?;
    if let Some(Finding::Truncated {
        area,
        chunk,
        nr_chunks,
    }) = report.first(Kind::Truncated)
    {
        return Err(Error::AreaTruncated {
            device,
            area: *area,
            chunk: *chunk,
            nr_chunks: *nr_chunks,
        });
    }
    if let Some(Finding::PastOriginEnd { at, e, .. }) = report.first(Kind::PastOriginEnd) {
        return Err(Error::OriginTooSmall {
            device,
            size: origin_bytes,
            needs: e.old.saturating_mul(store.layout().chunk_bytes),
            area: at.area,
            record: at.record,
            old: e.old,
        });
    }
    let fatal: u64 = [
        Kind::PastCowEnd,
        Kind::OverlapsMetadata,
        Kind::DuplicateOld,
        Kind::DuplicateNew,
    ]
    .iter()
    .map(|k| report.count(*k))
    .sum();
    if fatal > 0 {
        let first = report
            .findings
            .iter()
            .find(|f| f.kind() != Kind::OutOfOrder)
            .cloned()
            .expect("a fatal finding is kept");
        return Err(Error::Corrupt {
            device,
            count: fatal,
            first,
        });
    }
    let mut notes = Vec::new();
    let ooo = report.count(Kind::OutOfOrder);
    if ooo > 0 {
        notes.push(format!(
            "{} record(s) are out of order (first: {}); merged as the kernel would",
            ooo,
            report.first(Kind::OutOfOrder).unwrap()
        ));
    }
    if let Some((at, e)) = report.clipped {
        notes.push(format!(
            "{at}: origin chunk {} is the origin's last, partial chunk: copied up to the origin's end ({origin_bytes} bytes)",
            e.old
        ));
    }
    Ok((report, notes))
}

/// Merge the store on `cow` into `origin`. `on_step` is called before each
/// step (in dry-run mode it is all that happens); `progress` gets
/// (exceptions merged, total).
pub fn merge<O: Store + ?Sized, C: Store + ?Sized>(
    origin: &O,
    origin_name: &str,
    cow: &C,
    cow_name: &str,
    opts: &Options,
    on_step: &mut dyn FnMut(&Step),
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Outcome, Error> {
    let store = CowStore::open(cow, cow_name)?;
    let origin_bytes = origin.size();
    let (report, notes) = validate(&store, origin_bytes)?;
    let layout = *store.layout();
    let table = report.table;
    drop(report.findings);

    let total = table.exceptions;
    let mut out = Outcome {
        notes,
        ..Outcome::default()
    };
    let budget = Budget(Cell::new(opts.fail_after_writes));
    let mut copy_buf: Vec<u8> = Vec::new();
    let mut area_buf = store.area_buffer();
    progress(0, total);

    for info in table.areas.iter().rev() {
        if info.used == 0 {
            continue;
        }
        // The area as it is on disk now: the state a rerun would start from.
        store.read_area(info.index, &mut area_buf)?;
        let mut end = info.used as usize;
        while end > 0 {
            let area = Area::new(&area_buf);
            let len = area.run_ending_at(end);
            let start = end - len;
            let first = area.record(start);
            let step = Step {
                area: info.index,
                first_record: start as u64,
                old: first.old,
                new: first.new,
                len: len as u64,
                bytes: run_bytes(&layout, first, len as u64, origin_bytes),
            };
            on_step(&step);
            if !opts.dry_run {
                if copy_buf.is_empty() {
                    let longest = largest_run(&table, &layout).saturating_mul(layout.chunk_bytes);
                    copy_buf = vec![0u8; longest.min(opts.io_size.max(4096) as u64) as usize];
                }
                copy_run(
                    origin,
                    origin_name,
                    cow,
                    cow_name,
                    &step,
                    &layout,
                    &mut copy_buf,
                    &budget,
                )?;
                origin.flush().map_err(|e| {
                    Error::io(origin_name, "flushing the origin before the commit", e)
                })?;
                commit(
                    cow,
                    cow_name,
                    &layout,
                    info.index,
                    &mut area_buf,
                    start,
                    end,
                    &budget,
                )?;
            }
            end = start;
            out.steps += 1;
            out.exceptions += len as u64;
            out.bytes += step.bytes;
            progress(out.exceptions, total);
        }
    }
    Ok(out)
}

/// Bytes a run copies: its chunks, clipped at the origin's end.
fn run_bytes(layout: &Layout, first: Exception, len: u64, origin_bytes: u64) -> u64 {
    let start = first.old * layout.chunk_bytes;
    (len * layout.chunk_bytes).min(origin_bytes - start)
}

/// No run is longer than an area, nor than the table (in chunks).
fn largest_run(table: &super::cow::Table, layout: &Layout) -> u64 {
    table.exceptions.min(layout.epa).max(1)
}

#[allow(clippy::too_many_arguments)]
fn copy_run<O: Store + ?Sized, C: Store + ?Sized>(
    origin: &O,
    origin_name: &str,
    cow: &C,
    cow_name: &str,
    step: &Step,
    layout: &Layout,
    buf: &mut [u8],
    budget: &Budget,
) -> Result<(), Error> {
    let src0 = step.new * layout.chunk_bytes;
    let dst0 = step.old * layout.chunk_bytes;
    let read_err = |off: u64, n: usize, e| {
        Error::io(
            cow_name,
            format!(
                "reading COW chunks {}..{} (bytes {}..{})",
                step.new,
                step.new + step.len - 1,
                off,
                off + n as u64
            ),
            e,
        )
    };
    let write = |buf: &[u8], done: u64| {
        budget
            .spend()
            .and_then(|()| origin.write_at(buf, dst0 + done))
            .map_err(|e| {
                Error::io(
                    origin_name,
                    format!(
                        "writing origin chunks {}..{} (bytes {}..{}); the exceptions still list them, rerun to resume",
                        step.old,
                        step.old + step.len - 1,
                        dst0 + done,
                        dst0 + done + buf.len() as u64
                    ),
                    e,
                )
            })
    };
    // Pieces of one buffer (8 MiB by default), read then written: large
    // sequential I/O on both devices. (A read-ahead thread overlapping the
    // read of the next piece with this write measured slower, 2 CPUs,
    // page-cached files.)
    let size = buf.len() as u64;
    let mut done = 0u64;
    while done < step.bytes {
        let piece = &mut buf[..(step.bytes - done).min(size) as usize];
        cow.read_at(piece, src0 + done)
            .map_err(|e| read_err(src0 + done, piece.len(), e))?;
        write(piece, done)?;
        origin.start_writeback(dst0 + done, piece.len() as u64);
        done += piece.len() as u64;
    }
    Ok(())
}

/// Zero records `start..end` of area `index` and write the sectors that
/// changed, then flush: the commit point of a step.
#[allow(clippy::too_many_arguments)]
fn commit<C: Store + ?Sized>(
    cow: &C,
    cow_name: &str,
    layout: &Layout,
    index: u64,
    area_buf: &mut [u8],
    start: usize,
    end: usize,
    budget: &Budget,
) -> Result<(), Error> {
    for i in start..end {
        put_record(area_buf, i, Exception { old: 0, new: 0 });
    }
    // Whole 4 KiB blocks (or the whole area when chunks are smaller), the
    // unit a device writes atomically at best; a torn write is safe anyway:
    // every record it might zero belongs to this run.
    let align = 4096.min(area_buf.len());
    let lo = start * RECORD_SIZE / align * align;
    let hi = (end * RECORD_SIZE).div_ceil(align) * align;
    let chunk = layout.area_chunk(index);
    let off = chunk * layout.chunk_bytes + lo as u64;
    let what = || format!("writing metadata area {index} (chunk {chunk})");
    budget
        .spend()
        .and_then(|()| cow.write_at(&area_buf[lo..hi], off))
        .map_err(|e| {
            Error::io(
                cow_name,
                format!(
                    "{}; the merge stopped before this commit, rerun to resume",
                    what()
                ),
                e,
            )
        })?;
    cow.flush()
        .map_err(|e| Error::io(cow_name, format!("flushing after {}", what()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::cow::Header;
    use std::sync::Mutex;

    /// A device in memory.
    struct Mem(Mutex<Vec<u8>>);

    impl Store for Mem {
        fn size(&self) -> u64 {
            self.0.lock().unwrap().len() as u64
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
            let d = self.0.lock().unwrap();
            buf.copy_from_slice(&d[off as usize..off as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
            self.0.lock().unwrap()[off as usize..off as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
    }

    /// 512-byte chunks (32 records per area), `recs` in table order, data
    /// chunk c filled with byte c.
    fn store(recs: &[(u64, u64)], chunks: usize) -> Mem {
        let mut d = vec![0u8; chunks * 512];
        d[..16].copy_from_slice(&Header::new(1).to_bytes());
        for c in 2..chunks {
            d[c * 512..(c + 1) * 512].fill(c as u8);
        }
        let l = Layout::new(1, d.len() as u64);
        for c in 0..l.nr_areas() {
            let a = l.area_chunk(c) as usize;
            d[a * 512..(a + 1) * 512].fill(0);
        }
        for (i, &(old, new)) in recs.iter().enumerate() {
            let a = l.area_chunk(i as u64 / 32) as usize;
            put_record(
                &mut d[a * 512..(a + 1) * 512],
                i % 32,
                Exception { old, new },
            );
        }
        Mem(Mutex::new(d))
    }

    #[test]
    fn merges_last_to_first_in_runs() {
        let cow = store(&[(0, 2), (1, 3), (7, 4), (3, 5), (4, 6)], 40);
        let origin = Mem(Mutex::new(vec![0xee; 8 * 512 + 100]));
        let mut steps = Vec::new();
        let out = merge(
            &origin,
            "origin",
            &cow,
            "cow",
            &Options::default(),
            &mut |s| steps.push((s.old, s.new, s.len, s.bytes)),
            &mut |_, _| {},
        )
        .unwrap();
        assert_eq!(
            steps,
            vec![(3, 5, 2, 1024), (7, 4, 1, 512), (0, 2, 2, 1024)]
        );
        assert_eq!(out.exceptions, 5);
        let o = origin.0.lock().unwrap();
        for (old, new) in [(0, 2), (1, 3), (7, 4), (3, 5), (4, 6)] {
            assert!(o[old * 512..old * 512 + 512]
                .iter()
                .all(|&b| b == new as u8));
        }
        assert!(o[2 * 512..3 * 512].iter().all(|&b| b == 0xee));
        // the tail past chunk 8 is untouched
        assert!(o[8 * 512..].iter().all(|&b| b == 0xee));
        let c = cow.0.lock().unwrap();
        assert!(c[512..1024].iter().all(|&b| b == 0));
    }

    #[test]
    fn clips_the_origins_partial_last_chunk() {
        let cow = store(&[(2, 2)], 8);
        let origin = Mem(Mutex::new(vec![0xee; 2 * 512 + 100]));
        merge(
            &origin,
            "o",
            &cow,
            "c",
            &Options::default(),
            &mut |_| {},
            &mut |_, _| {},
        )
        .unwrap();
        assert_eq!(origin.size(), 1124);
        assert!(origin.0.lock().unwrap()[1024..].iter().all(|&b| b == 2));
    }

    #[test]
    fn refuses_before_writing() {
        // origin chunk 9 is past an 8-chunk origin
        let cow = store(&[(0, 2), (9, 3)], 8);
        let origin = Mem(Mutex::new(vec![0xee; 8 * 512]));
        let before = cow.0.lock().unwrap().clone();
        let e = merge(
            &origin,
            "o",
            &cow,
            "c",
            &Options::default(),
            &mut |_| {},
            &mut |_, _| {},
        )
        .unwrap_err();
        assert!(matches!(e, Error::OriginTooSmall { old: 9, .. }), "{e}");
        assert!(origin.0.lock().unwrap().iter().all(|&b| b == 0xee));
        assert_eq!(*cow.0.lock().unwrap(), before);
        // a duplicate origin chunk
        let cow = store(&[(0, 2), (0, 3)], 8);
        let e = merge(
            &origin,
            "o",
            &cow,
            "c",
            &Options::default(),
            &mut |_| {},
            &mut |_, _| {},
        )
        .unwrap_err();
        assert!(matches!(e, Error::Corrupt { count: 1, .. }), "{e}");
    }
}
