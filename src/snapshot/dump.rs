//! Listings of a store: human-readable text, XML and JSON. Exceptions are
//! listed per metadata area as runs: maximal sequences of records whose old
//! and new chunks both increase by one (the units the kernel merges).
//! The schemas are documented in `man/snap_dump.8`.

use std::io::Write;

use super::cow::{Area, AreaInfo, CowStore, Exception, Layout, Table, Usage};
use super::dev::Store;
use super::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Human,
    Xml,
    Json,
}

/// A run of consecutive exceptions: origin chunks `old..old+len` are in
/// COW chunks `new..new+len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub old: u64,
    pub new: u64,
    pub len: u64,
}

/// The runs of an area's records in use, in table order.
pub fn runs(area: &Area<'_>) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    let mut last: Option<Exception> = None;
    for e in area.exceptions() {
        match (last, out.last_mut()) {
            (Some(p), Some(r)) if p.precedes(&e) => r.len += 1,
            _ => out.push(Run {
                old: e.old,
                new: e.new,
                len: 1,
            }),
        }
        last = Some(e);
    }
    out
}

/// Everything the listing's heading reports.
struct Summary<'a> {
    name: &'a str,
    valid: u32,
    version: u32,
    layout: Layout,
    table: &'a Table,
    usage: Usage,
}

/// Write the listing of `store` to `out`.
pub fn dump<S: Store + ?Sized>(
    store: &CowStore<'_, S>,
    format: Format,
    out: &mut dyn Write,
) -> Result<(), Error> {
    // Pass 1: the table's shape (the heading carries totals).
    let table = store.scan(|_, _| Ok(()))?;
    let layout = *store.layout();
    let s = Summary {
        name: store.name(),
        valid: store.header().valid,
        version: store.header().version,
        layout,
        table: &table,
        usage: table.usage(&layout),
    };
    let w = |r: std::io::Result<()>| r.map_err(Error::Output);
    match format {
        Format::Human => w(human_head(out, &s))?,
        Format::Xml => w(xml_head(out, &s))?,
        Format::Json => w(json_head(out, &s))?,
    }
    // Pass 2: the areas.
    let mut first_area = true;
    store.scan(|info, area| {
        let rs = runs(area);
        w(match format {
            Format::Human => human_area(out, info, &rs),
            Format::Xml => xml_area(out, info, &rs),
            Format::Json => json_area(out, info, &rs, first_area),
        })?;
        first_area = false;
        Ok(())
    })?;
    w(match format {
        Format::Human => Ok(()),
        Format::Xml => writeln!(out, "</snapshot_store>"),
        Format::Json => writeln!(out, "\n  ]\n}}"),
    })?;
    w(out.flush())
}

fn human_head(out: &mut dyn Write, s: &Summary<'_>) -> std::io::Result<()> {
    let l = &s.layout;
    writeln!(out, "COW store:         {}", s.name)?;
    writeln!(
        out,
        "header:            {}, version {}",
        if s.valid != 0 { "valid" } else { "INVALID" },
        s.version
    )?;
    writeln!(
        out,
        "chunk size:        {} sectors ({} bytes)",
        l.chunk_sectors, l.chunk_bytes
    )?;
    writeln!(out, "exceptions/area:   {}", l.epa)?;
    writeln!(
        out,
        "device:            {} sectors, {} chunks, room for {} metadata areas and {} data chunks",
        l.cow_bytes / 512,
        l.nr_chunks,
        l.nr_areas(),
        l.data_capacity()
    )?;
    writeln!(
        out,
        "exceptions:        {} in {} area(s)",
        s.table.exceptions,
        s.table.areas.iter().filter(|a| a.used > 0).count()
    )?;
    if let Some(a) = s.table.truncated_at {
        writeln!(
            out,
            "truncated:         area {} (chunk {}) lies past the end of the device",
            a,
            l.area_chunk(a)
        )?;
    }
    writeln!(
        out,
        "space used:        {}/{} sectors, metadata {} sectors",
        s.usage.allocated_sectors, s.usage.total_sectors, s.usage.metadata_sectors
    )
}

fn human_area(out: &mut dyn Write, info: &AreaInfo, runs: &[Run]) -> std::io::Result<()> {
    writeln!(
        out,
        "area {} (chunk {}): {} exception(s), {} run(s)",
        info.index,
        info.chunk,
        info.used,
        runs.len()
    )?;
    for r in runs {
        if r.len == 1 {
            writeln!(out, "  old {} -> new {}", r.old, r.new)?;
        } else {
            writeln!(
                out,
                "  old {}-{} -> new {}-{} ({} chunks)",
                r.old,
                r.old + (r.len - 1),
                r.new,
                r.new + (r.len - 1),
                r.len
            )?;
        }
    }
    Ok(())
}

fn xml_head(out: &mut dyn Write, s: &Summary<'_>) -> std::io::Result<()> {
    let l = &s.layout;
    write!(
        out,
        "<snapshot_store chunk_size=\"{}\" valid=\"{}\" version=\"{}\" exceptions_per_area=\"{}\" cow_sectors=\"{}\" nr_chunks=\"{}\" nr_exceptions=\"{}\" allocated_sectors=\"{}\" metadata_sectors=\"{}\"",
        l.chunk_sectors,
        s.valid,
        s.version,
        l.epa,
        s.usage.total_sectors,
        l.nr_chunks,
        s.table.exceptions,
        s.usage.allocated_sectors,
        s.usage.metadata_sectors
    )?;
    if let Some(a) = s.table.truncated_at {
        write!(out, " truncated_area=\"{a}\"")?;
    }
    writeln!(out, ">")
}

fn xml_area(out: &mut dyn Write, info: &AreaInfo, runs: &[Run]) -> std::io::Result<()> {
    if runs.is_empty() {
        return writeln!(
            out,
            "  <area index=\"{}\" chunk=\"{}\" nr_exceptions=\"0\"/>",
            info.index, info.chunk
        );
    }
    writeln!(
        out,
        "  <area index=\"{}\" chunk=\"{}\" nr_exceptions=\"{}\">",
        info.index, info.chunk, info.used
    )?;
    for r in runs {
        writeln!(
            out,
            "    <run old_begin=\"{}\" new_begin=\"{}\" length=\"{}\"/>",
            r.old, r.new, r.len
        )?;
    }
    writeln!(out, "  </area>")
}

fn json_head(out: &mut dyn Write, s: &Summary<'_>) -> std::io::Result<()> {
    let l = &s.layout;
    writeln!(out, "{{")?;
    writeln!(out, "  \"chunk_size\": {},", l.chunk_sectors)?;
    writeln!(out, "  \"valid\": {},", s.valid != 0)?;
    writeln!(out, "  \"version\": {},", s.version)?;
    writeln!(out, "  \"exceptions_per_area\": {},", l.epa)?;
    writeln!(out, "  \"cow_sectors\": {},", s.usage.total_sectors)?;
    writeln!(out, "  \"nr_chunks\": {},", l.nr_chunks)?;
    writeln!(out, "  \"nr_exceptions\": {},", s.table.exceptions)?;
    writeln!(
        out,
        "  \"allocated_sectors\": {},",
        s.usage.allocated_sectors
    )?;
    writeln!(out, "  \"metadata_sectors\": {},", s.usage.metadata_sectors)?;
    match s.table.truncated_at {
        Some(a) => writeln!(out, "  \"truncated_area\": {a},")?,
        None => writeln!(out, "  \"truncated_area\": null,")?,
    }
    write!(out, "  \"areas\": [")
}

fn json_area(
    out: &mut dyn Write,
    info: &AreaInfo,
    runs: &[Run],
    first: bool,
) -> std::io::Result<()> {
    write!(
        out,
        "{}\n    {{\"index\": {}, \"chunk\": {}, \"nr_exceptions\": {}, \"runs\": [",
        if first { "" } else { "," },
        info.index,
        info.chunk,
        info.used
    )?;
    for (i, r) in runs.iter().enumerate() {
        write!(
            out,
            "{}\n      {{\"old_begin\": {}, \"new_begin\": {}, \"length\": {}}}",
            if i == 0 { "" } else { "," },
            r.old,
            r.new,
            r.len
        )?;
    }
    if runs.is_empty() {
        write!(out, "]}}")
    } else {
        write!(out, "\n    ]}}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::cow::put_record;

    #[test]
    fn runs_group_consecutive_records() {
        let mut b = vec![0u8; 512];
        let recs = [(0, 2), (1, 3), (2, 4), (9, 5), (0, 6), (1, 7), (3, 8)];
        for (i, &(old, new)) in recs.iter().enumerate() {
            put_record(&mut b, i, Exception { old, new });
        }
        let r = runs(&Area::new(&b));
        assert_eq!(
            r,
            vec![
                Run {
                    old: 0,
                    new: 2,
                    len: 3
                },
                Run {
                    old: 9,
                    new: 5,
                    len: 1
                },
                Run {
                    old: 0,
                    new: 6,
                    len: 2
                },
                Run {
                    old: 3,
                    new: 8,
                    len: 1
                },
            ]
        );
    }
}
