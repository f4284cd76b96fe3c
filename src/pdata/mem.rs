//! Large zeroed arrays touched at random (per-block tables over a whole
//! device).
//!
//! Two costs of such arrays are not in the code that uses them:
//! * with 4 KiB pages nearly every random touch of a table of tens or
//!   hundreds of MiB misses the TLB too (a page walk, dearer still in a
//!   VM). So a large array sits in 2 MiB-aligned stretches the kernel is
//!   asked to back with huge pages (where transparent huge pages are off
//!   it is ordinary memory, paid for page by page as it is touched).
//! * a page first *read* is mapped to the shared zero page; the first
//!   write then replaces it, which flushes that address from every core's
//!   TLB: an interrupt to the other core when the process has two threads
//!   running. Callers touch a fresh element by writing it first where they
//!   can (see [`HugeZeroed::get`]).

const HUGE_PAGE: usize = 2 << 20;

/// Per-block tables from this size on sit in huge pages (see
/// [`HugeZeroed::new_table`]).
const TABLE_HUGE_FROM: usize = 32 << 20;

/// A zeroed array of `u64`, huge-page aligned when it is large enough to
/// hold a huge page.
#[derive(Debug)]
pub struct HugeZeroed {
    /// Zeroed by the allocator (fresh pages: untouched parts cost nothing).
    mem: Box<[u64]>,
    /// Offset of element 0 in `mem`.
    base: usize,
    len: usize,
    /// Aligned and advised to be backed by huge pages.
    huge: bool,
}

impl HugeZeroed {
    pub fn new(len: usize) -> HugeZeroed {
        if len * 8 < HUGE_PAGE {
            return HugeZeroed::small(len);
        }
        // Room to start at a 2 MiB boundary; the slack is never touched.
        let mem = vec![0u64; len + HUGE_PAGE / 8].into_boxed_slice();
        let addr = mem.as_ptr() as usize;
        let base = (addr.next_multiple_of(HUGE_PAGE) - addr) / 8;
        #[cfg(target_os = "linux")]
        // SAFETY: the range lies inside `mem`; advice changes no contents.
        unsafe {
            libc::madvise(
                mem.as_ptr().add(base) as *mut libc::c_void,
                len * 8,
                libc::MADV_HUGEPAGE,
            );
        }
        HugeZeroed {
            mem,
            base,
            len,
            huge: true,
        }
    }

    /// In ordinary pages.
    fn small(len: usize) -> HugeZeroed {
        HugeZeroed {
            mem: vec![0u64; len].into_boxed_slice(),
            base: 0,
            len,
            huge: false,
        }
    }

    /// A per-block table over a device: in huge pages from 32 MiB on,
    /// where random touches over more memory than the TLB reaches with
    /// 4 KiB pages (a few MiB) pay for them; below that in ordinary pages,
    /// as a huge page would also back the parts never touched (blocks of a
    /// device that are not in use).
    pub fn new_table(len: usize) -> HugeZeroed {
        if len * 8 >= TABLE_HUGE_FROM {
            HugeZeroed::new(len)
        } else {
            HugeZeroed::small(len)
        }
    }

    /// Whether the array sits in huge pages.
    pub fn is_huge(&self) -> bool {
        self.huge
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline(always)]
    pub fn words(&self) -> &[u64] {
        &self.mem[self.base..self.base + self.len]
    }

    #[inline(always)]
    pub fn words_mut(&mut self) -> &mut [u64] {
        &mut self.mem[self.base..self.base + self.len]
    }

    /// Element `i`, or None past the end. Reading an element no one wrote
    /// maps its page to the zero page (see the module notes).
    #[inline(always)]
    pub fn get(&self, i: usize) -> Option<u64> {
        self.words().get(i).copied()
    }

    /// [`HugeZeroed::new`], its memory faulted in now by a write at the
    /// start of each huge page: where the kernel backs them with huge
    /// pages, it zeroes them here rather than at the first real write (so
    /// a thread with time to spare can pay for it). Elsewhere this costs
    /// one 4 KiB page per 2 MiB, which is all it takes.
    pub fn new_faulted_in(len: usize) -> HugeZeroed {
        let mut z = HugeZeroed::new(len);
        for w in z.words_mut().iter_mut().step_by(HUGE_PAGE / 8) {
            // Volatile: a store of the zero already there is not dropped.
            // SAFETY: `w` is a valid, aligned, exclusively borrowed u64.
            unsafe { std::ptr::write_volatile(w, 0) };
        }
        z
    }

    /// A handle that faults this array's memory in from another thread
    /// while its owner goes on using it (see [`Populate`]).
    pub fn populate_handle(&self) -> Populate {
        Populate {
            addr: self.words().as_ptr() as usize,
            len: self.len * 8,
        }
    }
}

/// Faults a [`HugeZeroed`]'s memory in, writable, by the kernel's
/// `MADV_POPULATE_WRITE` (Linux 5.14): as [`HugeZeroed::new_faulted_in`]
/// does, but from any thread while the owner goes on using the array,
/// since the kernel changes no contents (nothing to race with the owner's
/// writes). A hint: nothing happens where the kernel lacks it, and an
/// address range no longer mapped is refused by the kernel, harmlessly.
#[derive(Debug, Clone, Copy)]
pub struct Populate {
    addr: usize,
    len: usize,
}

impl Populate {
    pub fn run(self) {
        #[cfg(target_os = "linux")]
        if self.len > 0 {
            // The start rounded down to a page, as madvise requires.
            let start = self.addr & !4095;
            // SAFETY: advice that changes no memory contents; the kernel
            // checks the range.
            unsafe {
                libc::madvise(
                    start as *mut libc::c_void,
                    self.len + (self.addr - start),
                    libc::MADV_POPULATE_WRITE,
                );
            }
        }
    }
}

impl Clone for HugeZeroed {
    /// A copy of the elements only (the alignment slack stays untouched),
    /// in the same kind of pages.
    fn clone(&self) -> HugeZeroed {
        let mut c = if self.huge {
            HugeZeroed::new(self.len)
        } else {
            HugeZeroed::small(self.len)
        };
        c.words_mut().copy_from_slice(self.words());
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_take_huge_pages_only_when_large() {
        let small = HugeZeroed::new_table(1 << 20);
        assert!(!small.is_huge() && !small.clone().is_huge());
        let big = HugeZeroed::new_table(TABLE_HUGE_FROM / 8);
        assert!(big.is_huge());
        assert_eq!(big.words().as_ptr() as usize % HUGE_PAGE, 0);
        assert!(HugeZeroed::new(HUGE_PAGE / 8).is_huge());
    }

    #[test]
    fn zeroed_and_aligned_when_large() {
        for len in [0, 1, 1000, HUGE_PAGE / 8, 3 * HUGE_PAGE / 8 + 5] {
            let mut z = HugeZeroed::new(len);
            assert!(HugeZeroed::new_faulted_in(len)
                .words()
                .iter()
                .all(|&w| w == 0));
            assert_eq!(z.len(), len);
            assert!(z.words().iter().all(|&w| w == 0));
            if len * 8 >= HUGE_PAGE {
                assert_eq!(z.words().as_ptr() as usize % HUGE_PAGE, 0);
            }
            if len > 0 {
                z.words_mut()[len - 1] = 7;
                let c = z.clone();
                assert_eq!(c.get(len - 1), Some(7));
                assert_eq!(c.get(len), None);
                // Populating changes nothing, even while the array is in use.
                let p = z.populate_handle();
                std::thread::spawn(move || p.run()).join().unwrap();
                assert_eq!(z.get(len - 1), Some(7));
                assert!(z.words()[..len - 1].iter().all(|&w| w == 0));
            }
        }
    }
}
