//! bf16 matrix products on Intel's AMX tiles, with f32 accumulation.
//!
//! An AMX tile is 16 rows of 64 bytes; `tdpbf16ps` adds to a `16×16` f32 tile the product of a
//! `16×32` bf16 tile (`a`, row-major) and a `32×16` one (`b`) stored as 16 rows of 16 column
//! pairs (row `r` holds `b[2r][j], b[2r+1][j]` for each `j`: the "pair" layout). The kernel here
//! computes `32×32` blocks of `dst (m×n) = Σ_terms a_term (m×k) · b_term (k×n)` from two tiles
//! of each operand at a time, with every operand described by where its tiles lie
//! ([`TileWalk`]). Sums of several products (a convolution's taps) stay in the tile registers.
//!
//! The tiles need the CPU's AMX-TILE and AMX-BF16 and the kernel's permission to use the large
//! tile state, which [`enable`] asks for once. Everything else (packing, conversion) is plain
//! Rust. Rounding to bf16 is to nearest, ties to even, as `vcvtneps2bf16` does.

use std::sync::OnceLock;

use rayon::prelude::*;

use super::DisjointWrites;

/// Elements of bf16 in a tile row (and `k` per tile).
pub const TILE_K: usize = 32;
/// Rows (and f32 columns) of a tile.
pub const TILE: usize = 16;
/// Rows and columns of the output block one kernel call computes.
pub const BLOCK: usize = 2 * TILE;

/// `x` rounded to bf16 (to nearest, ties to even; NaN stays NaN). Branch-free, so that loops of
/// it vectorise.
#[inline(always)]
pub fn bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
    let quiet_nan = (bits >> 16) | 0x40;
    (if bits & 0x7fff_ffff > 0x7f80_0000 {
        quiet_nan
    } else {
        rounded
    }) as u16
}

/// The f32 value of a bf16.
#[inline(always)]
pub fn f32_of(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// `n` rounded up to a multiple of `to`.
pub fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

/// Whether this process may run the AMX kernels: the CPU has AMX-TILE and AMX-BF16 and the
/// kernel granted the tile state. Asked once; the answer (or why not) is kept.
pub fn enable() -> Result<(), String> {
    static STATE: OnceLock<Result<(), String>> = OnceLock::new();
    STATE.get_or_init(request).clone()
}

/// Panics, saying why, unless [`enable`] succeeds: what packs weights for the tiles calls it, so
/// that no tile instruction can run where the CPU or the OS lacks them.
pub fn require() {
    if let Err(why) = enable() {
        panic!("bf16 products on AMX tiles: {why}");
    }
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn request() -> Result<(), String> {
    // CPUID leaf 7 (when the CPU has it): EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
    let max_leaf = std::arch::x86_64::__cpuid(0).eax;
    let edx = if max_leaf >= 7 {
        std::arch::x86_64::__cpuid_count(7, 0).edx
    } else {
        0
    };
    if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
        return Err(
            "this CPU has no AMX-BF16 tiles (Intel Xeon of 2023, Sapphire Rapids, \
                    or newer has them)"
                .into(),
        );
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: asks the kernel for a permission; touches no memory of ours.
    let granted = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    if granted != 0 {
        return Err(
            "the operating system does not let this process use AMX tiles (Linux 5.16 \
                    or newer does)"
                .into(),
        );
    }
    Ok(())
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
fn request() -> Result<(), String> {
    Err("AMX tiles are used only on x86-64 Linux".into())
}

/// Where the tiles of one operand lie, in bytes: tile `(i, kb)` (`i`: the `16`-row (for `a`) or
/// `16`-column (for `b`) index, `kb`: the `32`-wide `k` block) starts at
/// `base + i·tile_step + kb·k_step`, its rows `row_stride` apart.
#[derive(Debug, Clone, Copy)]
pub struct TileWalk {
    /// Bytes between the rows of one tile.
    pub row_stride: usize,
    /// Bytes from one tile to the next along `m` (for `a`) or `n` (for `b`).
    pub tile_step: usize,
    /// Bytes from one `k` block to the next.
    pub k_step: usize,
}

/// Which side of a product a packed matrix is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operand {
    /// `a`: rows of 32 `k` values, `[m/16][k/32][16][32]`.
    A,
    /// `b`: 16 rows of column pairs, `[n/16][k/32][16 pairs][16][2]`.
    B,
}

impl Operand {
    /// Where element `(i, kk)` of a tile lies in it: `i` along `m` (for `a`) or `n` (for `b`),
    /// `kk` along `k`.
    fn slot(self, i: usize, kk: usize) -> usize {
        match self {
            Self::A => i * TILE_K + kk,
            Self::B => (kk / 2) * 2 * TILE + 2 * i + kk % 2,
        }
    }
}

/// A matrix packed into tiles for one side of a product, bf16, zero-padded to whole blocks.
#[derive(Debug, Clone)]
pub struct Tiles {
    data: Vec<u16>,
    operand: Operand,
    /// Rows before padding (`m` for `a`, `k` for `b`).
    pub rows: usize,
    /// Columns before padding (`k` for `a`, `n` for `b`).
    pub cols: usize,
    k_blocks: usize,
}

/// How a `rows × cols` matrix lies in the tiles of one operand.
#[derive(Debug, Clone, Copy)]
struct TileLayout {
    operand: Operand,
    /// Rows or columns along `m` (for `a`) or `n` (for `b`).
    outer: usize,
    /// Length along `k`.
    depth: usize,
    k_blocks: usize,
}

impl TileLayout {
    /// Elements of one tile.
    const TILE_LEN: usize = TILE * TILE_K;

    fn new(operand: Operand, rows: usize, cols: usize) -> Self {
        let (outer, depth) = match operand {
            Operand::A => (rows, cols),
            Operand::B => (cols, rows),
        };
        Self {
            operand,
            outer,
            depth,
            k_blocks: depth.div_ceil(TILE_K),
        }
    }

    /// Tiles in all, zero-padded to whole blocks.
    fn tiles(&self) -> usize {
        round_up(self.outer, BLOCK) / TILE * self.k_blocks
    }

    /// Calls `f(slot, r, c)` for each element `(r, c)` of the matrix that lies in tile `t`,
    /// `slot` being its place in the tile.
    fn visit(&self, t: usize, mut f: impl FnMut(usize, usize, usize)) {
        let (ot, kb) = (t / self.k_blocks, t % self.k_blocks);
        for i in 0..TILE.min(self.outer.saturating_sub(ot * TILE)) {
            for kk in 0..TILE_K.min(self.depth - kb * TILE_K) {
                let (o, k) = (ot * TILE + i, kb * TILE_K + kk);
                let slot = self.operand.slot(i, kk);
                match self.operand {
                    Operand::A => f(slot, o, k),
                    Operand::B => f(slot, k, o),
                }
            }
        }
    }

    fn packed(self, data: Vec<u16>, rows: usize, cols: usize) -> Tiles {
        Tiles {
            data,
            operand: self.operand,
            rows,
            cols,
            k_blocks: self.k_blocks,
        }
    }
}

impl Tiles {
    /// Packs the `rows × cols` matrix whose element `(r, c)` is `at(r, c)` as `operand`.
    pub fn pack(
        operand: Operand,
        rows: usize,
        cols: usize,
        at: impl Fn(usize, usize) -> f32 + Sync,
    ) -> Self {
        let layout = TileLayout::new(operand, rows, cols);
        let mut data = vec![0u16; layout.tiles() * TileLayout::TILE_LEN];
        data.par_chunks_mut(TileLayout::TILE_LEN)
            .enumerate()
            .for_each(|(t, dst)| layout.visit(t, |slot, r, c| dst[slot] = bf16(at(r, c))));
        layout.packed(data, rows, cols)
    }

    /// Packs `count` matrices of `rows × cols` as `operand` in one pass: `at(r, c, values)`
    /// sets `values[j]` to element `(r, c)` of matrix `j`. A source that holds the matrices'
    /// elements side by side (a convolution's taps) is read once, instead of once per matrix.
    pub fn pack_each(
        operand: Operand,
        rows: usize,
        cols: usize,
        count: usize,
        at: impl Fn(usize, usize, &mut [f32]) + Sync,
    ) -> Vec<Self> {
        let layout = TileLayout::new(operand, rows, cols);
        let len = layout.tiles() * TileLayout::TILE_LEN;
        let mut data: Vec<Vec<u16>> = (0..count).map(|_| vec![0u16; len]).collect();
        let dst: Vec<DisjointWrites<u16>> = data
            .iter_mut()
            .map(|matrix| DisjointWrites(matrix.as_mut_ptr()))
            .collect();
        (0..layout.tiles()).into_par_iter().for_each(|t| {
            let mut values = vec![0f32; count];
            layout.visit(t, |slot, r, c| {
                at(r, c, &mut values);
                for (matrix, &value) in dst.iter().zip(&values) {
                    // SAFETY: `t · TILE_LEN + slot` lies in tile `t` of each matrix's `len`
                    // elements, and only tile `t`'s task writes there.
                    unsafe { *matrix.ptr().add(t * TileLayout::TILE_LEN + slot) = bf16(value) };
                }
            });
        });
        data.into_iter()
            .map(|data| layout.packed(data, rows, cols))
            .collect()
    }

    /// Element `(r, c)` as f32 (what the products use).
    pub fn get(&self, r: usize, c: usize) -> f32 {
        let (o, k) = match self.operand {
            Operand::A => (r, c),
            Operand::B => (c, r),
        };
        let tile = (o / TILE * self.k_blocks + k / TILE_K) * TILE * TILE_K;
        f32_of(self.data[tile + self.operand.slot(o % TILE, k % TILE_K)])
    }

    /// The `k` blocks of a row (for `a`) or column (for `b`) of tiles.
    pub fn k_blocks(&self) -> usize {
        self.k_blocks
    }

    /// Where its tiles lie (the same for both sides: tiles of 16 rows of 64 bytes, one after
    /// the other along `k`).
    pub fn walk(&self) -> TileWalk {
        TileWalk {
            row_stride: TILE_K * 2,
            tile_step: self.k_blocks * TILE * TILE_K * 2,
            k_step: TILE * TILE_K * 2,
        }
    }

    /// The first tile.
    pub fn as_ptr(&self) -> *const u8 {
        self.data.as_ptr().cast()
    }
}

/// One product of a sum: where its `a` and `b` tiles start.
#[derive(Debug, Clone, Copy)]
pub struct Term {
    /// Tile `(0, 0)` of `a`.
    pub a: *const u8,
    /// Tile `(0, 0)` of `b`.
    pub b: *const u8,
}

/// `dst = Σ_terms a·b` over `k_blocks` blocks of `k`, for `m × n` (both multiples of
/// [`BLOCK`]), `dst` row-major with rows `dst_stride` f32 apart, on the rayon pool.
///
/// # Safety
/// [`enable`] must have succeeded. Every tile the walks reach for `m`, `n` and `k_blocks` must be
/// readable from every term, `dst` must be valid for `m` rows of `n` f32 at its stride, and the
/// terms must not overlap `dst`.
pub unsafe fn sum_of_products(
    dst: *mut f32,
    dst_stride: usize,
    (m, n): (usize, usize),
    k_blocks: usize,
    terms: &[Term],
    a: TileWalk,
    b: TileWalk,
) {
    debug_assert!(m % BLOCK == 0 && n % BLOCK == 0);
    let (m_blocks, n_blocks) = (m / BLOCK, n / BLOCK);
    // Tasks of several output blocks along `n` that share their `a` tiles.
    let n_per_task = n_blocks.clamp(1, 8);
    let tasks_n = n_blocks.div_ceil(n_per_task);
    // Each task writes its own blocks of `dst`.
    let dst = DisjointWrites(dst);
    let terms = SendTerms(terms);
    (0..m_blocks * tasks_n).into_par_iter().for_each(|task| {
        let (mb, tn) = (task / tasks_n, task % tasks_n);
        let _ = &terms;
        // SAFETY: forwarded from the caller; blocks of different tasks don't overlap.
        unsafe {
            configure();
            for nb in tn * n_per_task..((tn + 1) * n_per_task).min(n_blocks) {
                block(
                    dst.ptr().add(mb * BLOCK * dst_stride + nb * BLOCK),
                    dst_stride,
                    (mb, nb),
                    k_blocks,
                    terms.0,
                    a,
                    b,
                );
            }
        }
    });
}

/// [`sum_of_products`] on the calling thread only (for callers that are rayon tasks already).
///
/// # Safety
/// As [`sum_of_products`].
pub unsafe fn sum_of_products_here(
    dst: *mut f32,
    dst_stride: usize,
    (m, n): (usize, usize),
    k_blocks: usize,
    terms: &[Term],
    a: TileWalk,
    b: TileWalk,
) {
    debug_assert!(m % BLOCK == 0 && n % BLOCK == 0);
    // SAFETY: forwarded from the caller.
    unsafe {
        configure();
        for mb in 0..m / BLOCK {
            for nb in 0..n / BLOCK {
                let at = dst.add(mb * BLOCK * dst_stride + nb * BLOCK);
                block(at, dst_stride, (mb, nb), k_blocks, terms, a, b);
            }
        }
    }
}

struct SendTerms<'a>(&'a [Term]);
// SAFETY: the terms point at operands that are only read.
unsafe impl Send for SendTerms<'_> {}
unsafe impl Sync for SendTerms<'_> {}

/// The 64-byte tile configuration: palette 1, eight tiles of 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

/// Loads the tile configuration on this thread.
///
/// # Safety
/// [`enable`] must have succeeded.
#[cfg(target_arch = "x86_64")]
unsafe fn configure() {
    let mut config = TileConfig([0; 64]);
    config.0[0] = 1;
    for tile in 0..8 {
        config.0[16 + 2 * tile] = 64;
        config.0[48 + tile] = TILE as u8;
    }
    // SAFETY: a valid palette-1 configuration; the caller checked AMX is usable.
    unsafe { std::arch::asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack)) };
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn configure() {
    unreachable!("AMX is x86-64 only")
}

/// One `32×32` block of `dst`: tiles 0–3 accumulate, 4–5 hold `a`, 6–7 hold `b`.
///
/// # Safety
/// As [`sum_of_products`], with the tiles configured on this thread.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn block(
    dst: *mut f32,
    dst_stride: usize,
    (mb, nb): (usize, usize),
    k_blocks: usize,
    terms: &[Term],
    a: TileWalk,
    b: TileWalk,
) {
    use std::arch::asm;
    // SAFETY: every address is inside an operand (the caller's contract).
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack)
        );
        for term in terms {
            let a0 = term.a.add(2 * mb * a.tile_step);
            let a1 = a0.add(a.tile_step);
            let b0 = term.b.add(2 * nb * b.tile_step);
            let b1 = b0.add(b.tile_step);
            for kb in 0..k_blocks {
                let (ka, kb_) = (kb * a.k_step, kb * b.k_step);
                asm!(
                    "tileloadd tmm4, [{a0} + {sa}*1]",
                    "tileloadd tmm5, [{a1} + {sa}*1]",
                    "tileloadd tmm6, [{b0} + {sb}*1]",
                    "tileloadd tmm7, [{b1} + {sb}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a0.add(ka),
                    a1 = in(reg) a1.add(ka),
                    b0 = in(reg) b0.add(kb_),
                    b1 = in(reg) b1.add(kb_),
                    sa = in(reg) a.row_stride,
                    sb = in(reg) b.row_stride,
                    options(nostack, readonly)
                );
            }
        }
        let stride = dst_stride * 4;
        let lower = dst.add(TILE * dst_stride);
        asm!(
            "tilestored [{d0} + {s}*1], tmm0",
            "tilestored [{d1} + {s}*1], tmm1",
            "tilestored [{d2} + {s}*1], tmm2",
            "tilestored [{d3} + {s}*1], tmm3",
            d0 = in(reg) dst,
            d1 = in(reg) dst.add(TILE),
            d2 = in(reg) lower,
            d3 = in(reg) lower.add(TILE),
            s = in(reg) stride,
            options(nostack)
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn block(
    _: *mut f32,
    _: usize,
    _: (usize, usize),
    _: usize,
    _: &[Term],
    _: TileWalk,
    _: TileWalk,
) {
    unreachable!("AMX is x86-64 only")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::test_support::{random, values};

    #[test]
    fn rounds_to_nearest_even() {
        assert_eq!(bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even 1.
        assert_eq!(bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(f32_of(bf16(-2.5)), -2.5);
        assert!(f32_of(bf16(f32::NAN)).is_nan());
        assert_eq!(f32_of(bf16(f32::INFINITY)), f32::INFINITY);
    }

    /// The tiles' product against a plain sum over the same bf16 values, on sizes that need
    /// padding on every side, with two terms.
    #[test]
    fn sum_of_products_matches_a_plain_sum() {
        if enable().is_err() {
            eprintln!("skipped: no AMX on this machine");
            return;
        }
        let (m, n, k) = (37, 45, 70);
        let x = values(&random(&[2 * m * k], 1));
        let y = values(&random(&[2 * k * n], 2));
        let a: Vec<Tiles> = (0..2)
            .map(|t| Tiles::pack(Operand::A, m, k, |r, c| x[t * m * k + r * k + c]))
            .collect();
        let b: Vec<Tiles> = (0..2)
            .map(|t| Tiles::pack(Operand::B, k, n, |r, c| y[t * k * n + r * n + c]))
            .collect();
        let (mp, np) = (round_up(m, BLOCK), round_up(n, BLOCK));
        let mut dst = vec![0f32; mp * np];
        let terms: Vec<Term> = (0..2)
            .map(|t| Term {
                a: a[t].as_ptr(),
                b: b[t].as_ptr(),
            })
            .collect();
        // SAFETY: the packed operands cover `mp × k_blocks` and `k_blocks × np`.
        unsafe {
            sum_of_products(
                dst.as_mut_ptr(),
                np,
                (mp, np),
                a[0].k_blocks(),
                &terms,
                a[0].walk(),
                b[0].walk(),
            )
        };
        for r in 0..m {
            for c in 0..n {
                let want: f64 = (0..2)
                    .flat_map(|t| (0..k).map(move |i| (t, i)))
                    .map(|(t, i)| a[t].get(r, i) as f64 * b[t].get(i, c) as f64)
                    .sum();
                let got = dst[r * np + c] as f64;
                assert!(
                    (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "({r}, {c}): {got} vs {want}"
                );
            }
        }
    }
}
