//! Values of the thin trees: device details and block/time mappings.

use crate::pdata::btree::Value;
use crate::pdata::{le32, le64};

/// Device details tree value (24 bytes), keyed by thin device id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceDetails {
    pub mapped_blocks: u64,
    pub transaction_id: u64,
    pub creation_time: u32,
    pub snapshotted_time: u32,
}

impl Value for DeviceDetails {
    const SIZE: usize = 24;
    fn decode(b: &[u8]) -> Self {
        DeviceDetails {
            mapped_blocks: le64(b, 0),
            transaction_id: le64(b, 8),
            creation_time: le32(b, 16),
            snapshotted_time: le32(b, 20),
        }
    }
}

impl DeviceDetails {
    pub fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0..8].copy_from_slice(&self.mapped_blocks.to_le_bytes());
        b[8..16].copy_from_slice(&self.transaction_id.to_le_bytes());
        b[16..20].copy_from_slice(&self.creation_time.to_le_bytes());
        b[20..24].copy_from_slice(&self.snapshotted_time.to_le_bytes());
        b
    }
}

/// Device `id`'s details in the details tree at `root`, within a transaction.
pub fn lookup_details(
    txn: &crate::pdata::txn::Transaction,
    root: u64,
    id: u64,
) -> crate::pdata::Result<Option<DeviceDetails>> {
    Ok(
        crate::pdata::btree::lookup(txn, root, id, DeviceDetails::SIZE)?
            .map(|v| DeviceDetails::decode(&v)),
    )
}

/// Bottom-level mapping value: data block in the high 40 bits, the pool
/// time of the write in the low 24.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockTime {
    pub block: u64,
    pub time: u32,
}

impl BlockTime {
    #[inline(always)]
    pub fn unpack(v: u64) -> BlockTime {
        BlockTime {
            block: v >> 24,
            time: (v & 0xff_ffff) as u32,
        }
    }
    pub fn pack(&self) -> u64 {
        (self.block << 24) | (self.time as u64 & 0xff_ffff)
    }
}

impl Value for BlockTime {
    const SIZE: usize = 8;
    #[inline(always)]
    fn decode(b: &[u8]) -> Self {
        BlockTime::unpack(le64(b, 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_time_packing() {
        let bt = BlockTime {
            block: 0x12_3456_789a,
            time: 0xabcdef,
        };
        assert_eq!(BlockTime::unpack(bt.pack()), bt);
        assert_eq!(
            BlockTime::unpack((5 << 24) | 3),
            BlockTime { block: 5, time: 3 }
        );
    }
}
