//! thin_metadata_size: the metadata device size a pool needs, by the peer's
//! estimate (thin-provisioning-tools 1.3.x):
//!
//! ```text
//! nr_data_blocks = pool_size / block_size                  (rounded down)
//! nr_leaves      = ceil(nr_data_blocks / 126)              (leaves half full:
//!                                                           252 mappings each at most)
//! nr_blocks      = min(1 + nr_leaves + max_thins, 4161600) (superblock, leaves, a root
//!                                                           per thin; capped at the
//!                                                           largest metadata device)
//! size           = nr_blocks * 4096 bytes
//! ```
//!
//! printed in the requested unit: an integer or a value below 1 as the
//! shortest decimal that reads back exactly, anything else with two decimals.

use crate::pdata::btree::max_entries;
use crate::pdata::BLOCK_SIZE;

/// Blocks a metadata space map can address: 255 bitmaps of 16320 entries.
pub const MAX_METADATA_BLOCKS: u64 = 255 * ((BLOCK_SIZE as u64 - 16) * 4);

/// A unit of size, as the peer names and spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Byte,
    Sector,
    Kibibyte,
    Mebibyte,
    Gibibyte,
    Tebibyte,
    Pebibyte,
    Exbibyte,
    Kilobyte,
    Megabyte,
    Gigabyte,
    Terabyte,
    Petabyte,
    Exabyte,
}

/// (unit, bytes, accepted spellings, long name, letter). The long name of
/// the tebibyte is the peer's "terabyte".
const UNITS: &[(Unit, u64, &[&str], &str, &str)] = &[
    (Unit::Byte, 1, &["byte", "b"], "byte", "b"),
    (Unit::Sector, 512, &["sector", "s"], "sector", "s"),
    (
        Unit::Kibibyte,
        1 << 10,
        &["kibibyte", "KiB", "k"],
        "kibibyte",
        "k",
    ),
    (
        Unit::Mebibyte,
        1 << 20,
        &["mebibyte", "MiB", "m"],
        "mebibyte",
        "m",
    ),
    (
        Unit::Gibibyte,
        1 << 30,
        &["gibibyte", "GiB", "g"],
        "gibibyte",
        "g",
    ),
    (
        Unit::Tebibyte,
        1 << 40,
        &["tebibyte", "TiB", "t"],
        "terabyte",
        "t",
    ),
    (
        Unit::Pebibyte,
        1 << 50,
        &["pebibyte", "PiB", "p"],
        "pebibyte",
        "p",
    ),
    (
        Unit::Exbibyte,
        1 << 60,
        &["exbibyte", "EiB", "e"],
        "exbibyte",
        "e",
    ),
    (
        Unit::Kilobyte,
        1_000,
        &["kilobyte", "kB", "K"],
        "kilobyte",
        "K",
    ),
    (
        Unit::Megabyte,
        1_000_000,
        &["megabyte", "MB", "M"],
        "megabyte",
        "M",
    ),
    (
        Unit::Gigabyte,
        1_000_000_000,
        &["gigabyte", "GB", "G"],
        "gigabyte",
        "G",
    ),
    (
        Unit::Terabyte,
        1_000_000_000_000,
        &["terabyte", "TB", "T"],
        "terabyte",
        "T",
    ),
    (
        Unit::Petabyte,
        1_000_000_000_000_000,
        &["petabyte", "PB", "P"],
        "petabyte",
        "P",
    ),
    (
        Unit::Exabyte,
        1_000_000_000_000_000_000,
        &["exabyte", "EB", "E"],
        "exabyte",
        "E",
    ),
];

impl Unit {
    fn row(
        self,
    ) -> &'static (
        Unit,
        u64,
        &'static [&'static str],
        &'static str,
        &'static str,
    ) {
        UNITS.iter().find(|r| r.0 == self).unwrap()
    }

    /// The unit spelled `s` ("k", "KiB", "kibibyte", "K", "kB", ...).
    pub fn parse(s: &str) -> Option<Unit> {
        UNITS.iter().find(|r| r.2.contains(&s)).map(|r| r.0)
    }

    pub fn bytes(self) -> u64 {
        self.row().1
    }

    /// Singular long name ("sector", "kibibyte", ...).
    pub fn long_name(self) -> &'static str {
        self.row().3
    }

    /// One-letter form (lower case binary, upper case decimal).
    pub fn letter(self) -> &'static str {
        self.row().4
    }
}

/// Parse a size: decimal digits, then optionally a unit (sectors without).
/// Returns bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    if digits.is_empty() {
        return Err(format!(
            "'{s}' is not a size (a number, then an optional unit)"
        ));
    }
    let unit = if unit.is_empty() {
        Unit::Sector
    } else {
        Unit::parse(unit).ok_or_else(|| format!("'{s}': unknown unit '{unit}'"))?
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit.bytes()))
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// The data block size must be a non-zero multiple of 64 KiB, at most 1 GiB.
pub fn check_block_size(bytes: u64) -> Result<(), String> {
    if bytes == 0 || bytes % (64 << 10) != 0 {
        return Err("block size must be a multiple of 64 KiB".into());
    }
    if bytes > 1 << 30 {
        return Err("maximum block size is 1 GiB".into());
    }
    Ok(())
}

/// Estimated metadata size in bytes for `nr_data_blocks` and `max_thins`.
pub fn metadata_size(nr_data_blocks: u64, max_thins: u64) -> u64 {
    let per_leaf = max_entries(8) as u64 / 2;
    let nr_leaves = nr_data_blocks.div_ceil(per_leaf);
    let nr_blocks = 1u64
        .saturating_add(nr_leaves)
        .saturating_add(max_thins)
        .min(MAX_METADATA_BLOCKS);
    nr_blocks * BLOCK_SIZE as u64
}

/// How the size is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// "1856 sectors"
    Full,
    /// "1856" (`-n`)
    Numeric,
    /// "1856s" (`-n=short`)
    ShortUnit,
    /// "1856sectors" (`-n=long`)
    LongUnit,
}

/// `bytes` in `unit`, in `style`.
pub fn format_size(bytes: u64, unit: Unit, style: Style) -> String {
    let v = bytes as f64 / unit.bytes() as f64;
    let mut s = if v < 1.0 || v.trunc() == v {
        format!("{v}")
    } else {
        format!("{v:.2}")
    };
    match style {
        Style::Full => {
            s.push(' ');
            s.push_str(unit.long_name());
            s.push('s');
        }
        Style::Numeric => {}
        Style::ShortUnit => s.push_str(unit.letter()),
        Style::LongUnit => {
            s.push_str(unit.long_name());
            s.push('s');
        }
    }
    s
}

/// The whole computation from the command line's values: sizes in bytes.
pub fn estimate(block_size: u64, pool_size: u64, max_thins: u64) -> Result<u64, String> {
    check_block_size(block_size)?;
    if pool_size < block_size {
        return Err("pool size must be larger than block size".into());
    }
    Ok(metadata_size(pool_size / block_size, max_thins))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("1024"), Ok(1024 * 512));
        assert_eq!(parse_size("1024b"), Ok(1024));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("64kibibyte"), Ok(65536));
        assert_eq!(parse_size("64K"), Ok(64000));
        assert_eq!(parse_size("1t"), Ok(1 << 40));
        assert_eq!(parse_size("15e"), Ok(15 << 60));
        assert_eq!(parse_size("18446744073709551615b"), Ok(u64::MAX));
        for bad in [
            "",
            "k",
            "-1",
            "1.5m",
            "1x",
            "1kb",
            "1z",
            "1Y",
            "16e",
            "36028797018963968",
            "18446744073709551616b",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn block_size_limits() {
        assert!(check_block_size(65536).is_ok());
        assert!(check_block_size(1 << 30).is_ok());
        assert!(check_block_size(0).is_err());
        assert!(check_block_size(32768).is_err());
        assert!(check_block_size(65536 + 512).is_err());
        assert!(check_block_size(2 << 30).is_err());
    }

    #[test]
    fn estimate_by_hand() {
        // 1 GiB of 64 KiB blocks: 16384 blocks, 131 half-full leaves, 100 roots,
        // one superblock: 232 blocks = 950272 bytes = 1856 sectors.
        let b = estimate(65536, 1 << 30, 100).unwrap();
        assert_eq!(b, 232 * 4096);
        assert_eq!(format_size(b, Unit::Sector, Style::Numeric), "1856");
        assert_eq!(format_size(b, Unit::Sector, Style::Full), "1856 sectors");
        assert_eq!(format_size(b, Unit::Kibibyte, Style::ShortUnit), "928k");
        assert_eq!(
            format_size(b, Unit::Mebibyte, Style::LongUnit),
            "0.90625mebibytes"
        );
        assert_eq!(
            format_size(b, Unit::Megabyte, Style::Full),
            "0.950272 megabytes"
        );
        // Capped at the largest metadata device.
        assert_eq!(
            estimate(65536, u64::MAX, 0).unwrap(),
            MAX_METADATA_BLOCKS * 4096
        );
        assert_eq!(MAX_METADATA_BLOCKS, 4_161_600);
        assert!(estimate(1 << 20, 1 << 19, 1).is_err());
    }
}
