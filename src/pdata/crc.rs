//! CRC-32C (Castagnoli, as in iSCSI and ext4: reflected, initial value and
//! final xor 0xffffffff), the checksum of every metadata block.
//!
//! A block is 4 KiB and thin_check reads millions of them, so the checksum
//! is a good part of its time. The `crc32c` crate runs the processor's
//! `crc32` instruction, 8 bytes at a time in three interleaved streams:
//! about 190 ns a block on the machines this was measured on. Where the
//! processor has AVX-512 and its carry-less multiply (`vpclmulqdq`), long
//! inputs instead go through sixteen 16-byte lanes folded forward by
//! carry-less multiplication (the method of Gopal et al., "Fast CRC
//! Computation for Generic Polynomials Using PCLMULQDQ Instruction", Intel
//! 2009), four lanes to an instruction: about 75 ns a block. (The same
//! folding eight lanes at a time with the 16-byte `pclmulqdq` ran at
//! 280 ns there, slower than `crc32`; the 64-byte form of the instruction
//! has no intrinsic on this crate's minimum Rust, hence the assembly.)
//!
//! How a fold works. Read as a polynomial over GF(2), 16 bytes of input
//! have their first bit as the highest power (a reflected CRC takes each
//! byte's low bit first): bit `k` of the little-endian 128-bit lane stands
//! for `x^(127-k)`. A lane `S = H·x^64 + L` (H its low quadword) that still
//! has `D` bits of input after it counts as `S·x^D`, and
//! `S·x^D ≡ H·(x^(D+64) mod P) + L·(x^D mod P)` (mod P). Both products have
//! fewer than 128 bits and the CRC only needs its input mod P, so the lane
//! can be replaced by them, added (xor) to the lane `D` bits on. A
//! carry-less multiply of quadwords with bit `i` standing for `x^(63-i)`
//! gives a product whose bit `k` stands for `x^(126-k)`, one power short
//! of the lane's own scale; the constants make it up by holding
//! `x^(n-1) mod P` instead of `x^n mod P` (see `fold::fold_constant`). The
//! last lane, all the input mod P, goes through `crc32` from a zero
//! register, which multiplies by `x^32` and reduces as the CRC requires.

/// The CRC-32C of `data`.
#[inline]
pub fn crc32c(data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if data.len() >= fold::FROM && fold::available() {
        // SAFETY: the processor has every feature the fold needs.
        return unsafe { fold::crc32c(data) };
    }
    crc32c::crc32c(data)
}

#[cfg(target_arch = "x86_64")]
mod fold {
    use std::arch::x86_64::*;

    /// The CRC-32C polynomial, without its `x^32` term, highest power
    /// first.
    const POLY: u32 = 0x1edc_6f41;

    /// `x^n mod P`, highest power first.
    const fn x_pow_mod(n: u32) -> u32 {
        let mut r: u32 = 1;
        let mut i = 0;
        while i < n {
            let carry = r >> 31;
            r <<= 1;
            if carry == 1 {
                r ^= POLY;
            }
            i += 1;
        }
        r
    }

    /// The multiplier that carries a quadword standing `n` bits before
    /// the end of a fold forward (see the module notes): `x^(n-1) mod P`,
    /// bit-reversed into a quadword whose bit `i` stands for `x^(63-i)`.
    pub(super) const fn fold_constant(n: u32) -> u64 {
        (x_pow_mod(n - 1) as u64).reverse_bits()
    }

    /// The two multipliers of a fold by `d` bits, as one 16-byte lane: the
    /// low quadword's for the lane's first 8 bytes (`H`), then `L`'s.
    #[repr(C, align(16))]
    struct Fold([u64; 2]);

    impl Fold {
        const fn by(d: u32) -> Fold {
            Fold([fold_constant(d + 64), fold_constant(d)])
        }
    }

    /// Four 64-byte registers of lanes step 256 bytes at a time.
    static BY_256_BYTES: Fold = Fold::by(2048);
    /// One 64-byte register steps 64 bytes at a time.
    static BY_64_BYTES: Fold = Fold::by(512);
    /// The last four lanes, 3, 2 and 1 lanes before the end.
    const BY_3_LANES: Fold = Fold::by(384);
    const BY_2_LANES: Fold = Fold::by(256);
    const BY_1_LANE: Fold = Fold::by(128);

    /// Inputs shorter than this go to the `crc32` instruction alone: the
    /// folding starts with 256 bytes in four registers.
    pub(super) const FROM: usize = 256;

    /// Whether this processor (and its kernel) can run [`crc32c()`].
    #[inline]
    pub(super) fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("vpclmulqdq")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
            && std::arch::is_x86_feature_detected!("sse4.2")
    }

    /// [`super::crc32c`] by folding; `data` is at least [`FROM`] bytes.
    ///
    /// # Safety
    /// The processor must have the features [`available`] checks.
    #[target_feature(enable = "pclmulqdq,sse4.2")]
    pub(super) unsafe fn crc32c(data: &[u8]) -> u32 {
        // The bytes before the last whole multiple of 64 go through
        // `crc32`; the register it leaves is added into the first lane's
        // first 4 bytes, which is how a CRC carries on from a register.
        let head = data.len() % 64;
        let mut words = data[..head].chunks_exact(8);
        let mut reg = u64::from(!0u32);
        for w in &mut words {
            reg = _mm_crc32_u64(reg, u64::from_le_bytes(w.try_into().unwrap()));
        }
        let mut reg = reg as u32;
        for &b in words.remainder() {
            reg = _mm_crc32_u8(reg, b);
        }
        let blocks = (data.len() - head) / 64;
        debug_assert!(blocks >= 4);
        let mut last = [0u64; 8];
        // zmm0-3 hold 16 lanes; each round folds them 256 bytes forward
        // onto the next 256 bytes (two multiplies and a three-way xor per
        // register). Then the four fold into zmm0, which takes in the
        // remaining 64-byte blocks one by one, and is stored to `last`.
        // Every vector register the compiler could use (xmm0-15) is
        // declared clobbered, so the closing vzeroupper loses nothing.
        //
        // SAFETY: reads `blocks * 64` bytes from `data[head..]` (in
        // bounds), writes 64 bytes to `last`; the features are the
        // caller's promise.
        unsafe {
            std::arch::asm!(
                "vmovd xmm4, {reg:e}",
                "vmovdqu64 zmm0, [{p}]",
                "vmovdqu64 zmm1, [{p} + 64]",
                "vmovdqu64 zmm2, [{p} + 128]",
                "vmovdqu64 zmm3, [{p} + 192]",
                "vpxorq zmm0, zmm0, zmm4",
                "add {p}, 256",
                "sub {n}, 4",
                "vbroadcasti32x4 zmm5, [{by4}]",
                "vbroadcasti32x4 zmm6, [{by1}]",
                "2:",
                "cmp {n}, 4",
                "jb 3f",
                "vpclmulqdq zmm7, zmm0, zmm5, 0x00",
                "vpclmulqdq zmm0, zmm0, zmm5, 0x11",
                "vpclmulqdq zmm8, zmm1, zmm5, 0x00",
                "vpclmulqdq zmm1, zmm1, zmm5, 0x11",
                "vpclmulqdq zmm9, zmm2, zmm5, 0x00",
                "vpclmulqdq zmm2, zmm2, zmm5, 0x11",
                "vpclmulqdq zmm10, zmm3, zmm5, 0x00",
                "vpclmulqdq zmm3, zmm3, zmm5, 0x11",
                "vpternlogq zmm0, zmm7, [{p}], 0x96",
                "vpternlogq zmm1, zmm8, [{p} + 64], 0x96",
                "vpternlogq zmm2, zmm9, [{p} + 128], 0x96",
                "vpternlogq zmm3, zmm10, [{p} + 192], 0x96",
                "add {p}, 256",
                "sub {n}, 4",
                "jmp 2b",
                "3:",
                "vpclmulqdq zmm7, zmm0, zmm6, 0x00",
                "vpclmulqdq zmm0, zmm0, zmm6, 0x11",
                "vpternlogq zmm0, zmm7, zmm1, 0x96",
                "vpclmulqdq zmm7, zmm0, zmm6, 0x00",
                "vpclmulqdq zmm0, zmm0, zmm6, 0x11",
                "vpternlogq zmm0, zmm7, zmm2, 0x96",
                "vpclmulqdq zmm7, zmm0, zmm6, 0x00",
                "vpclmulqdq zmm0, zmm0, zmm6, 0x11",
                "vpternlogq zmm0, zmm7, zmm3, 0x96",
                "4:",
                "test {n}, {n}",
                "jz 5f",
                "vpclmulqdq zmm7, zmm0, zmm6, 0x00",
                "vpclmulqdq zmm0, zmm0, zmm6, 0x11",
                "vpternlogq zmm0, zmm7, [{p}], 0x96",
                "add {p}, 64",
                "dec {n}",
                "jmp 4b",
                "5:",
                "vmovdqu64 [{last}], zmm0",
                "vzeroupper",
                reg = in(reg) reg,
                p = inout(reg) data.as_ptr().add(head) => _,
                n = inout(reg) blocks => _,
                by4 = in(reg) BY_256_BYTES.0.as_ptr(),
                by1 = in(reg) BY_64_BYTES.0.as_ptr(),
                last = in(reg) last.as_mut_ptr(),
                out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _,
                out("xmm4") _, out("xmm5") _, out("xmm6") _, out("xmm7") _,
                out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _,
                out("xmm12") _, out("xmm13") _, out("xmm14") _, out("xmm15") _,
                options(nostack),
            );
        }
        // Macros, not closures: a closure would not share this function's
        // target features, and every multiply would become a call.
        macro_rules! lane {
            ($i:expr) => {
                _mm_set_epi64x(last[2 * $i + 1] as i64, last[2 * $i] as i64)
            };
        }
        macro_rules! fold {
            ($v:expr, $by:expr) => {{
                let k = _mm_set_epi64x($by.0[1] as i64, $by.0[0] as i64);
                _mm_xor_si128(
                    _mm_clmulepi64_si128($v, k, 0x00),
                    _mm_clmulepi64_si128($v, k, 0x11),
                )
            }};
        }
        let s = _mm_xor_si128(
            _mm_xor_si128(fold!(lane!(0), BY_3_LANES), fold!(lane!(1), BY_2_LANES)),
            _mm_xor_si128(fold!(lane!(2), BY_1_LANE), lane!(3)),
        );
        let lo = _mm_cvtsi128_si64(s) as u64;
        let hi = _mm_extract_epi64(s, 1) as u64;
        !(_mm_crc32_u64(_mm_crc32_u64(0, lo), hi) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        // RFC 3720 B.4, and the usual check value.
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62a8_ab43);
        let rising: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&rising), 0x46dd_794e);
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn fold_constants_are_powers_of_x() {
        // x^31 is the top bit of a 32-bit remainder; reversed into a
        // quadword it lands on bit 32. x^32 mod P is P's low terms.
        assert_eq!(fold::fold_constant(32), 1 << 32);
        assert_eq!(
            fold::fold_constant(33),
            u64::from(0x1edc_6f41u32.reverse_bits()) << 32
        );
    }

    /// Every length across the switch to folding and over several rounds
    /// of it, at several alignments, against the plain `crc32` path (on a
    /// processor without the fold both sides are the plain path).
    #[test]
    fn folding_agrees_with_the_plain_crc() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let data: Vec<u8> = (0..5000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for len in (0..1100).chain([4092, 4093, 4096, 4990]) {
            for start in [0, 1, 3, 8] {
                let d = &data[start..start + len];
                assert_eq!(crc32c(d), crc32c::crc32c(d), "len {len} start {start}");
            }
        }
        // A single flipped bit anywhere in a block changes the checksum.
        let mut block = data[..4092].to_vec();
        let good = crc32c(&block);
        for bit in [0, 7, 8 * 60, 8 * 2000 + 3, 8 * 4091 + 7] {
            block[bit / 8] ^= 1 << (bit % 8);
            assert_ne!(crc32c(&block), good, "bit {bit}");
            block[bit / 8] ^= 1 << (bit % 8);
        }
    }
}
