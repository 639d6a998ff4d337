//! Splitting many slices into fixed-size pieces so rayon can balance work across tensors of any sizes,
//! without concatenating them. Pieces keep source order, so anything reduced in piece order is
//! reduced in global index order: that is what makes tie-breaking independent of the thread count.

/// Elements per piece: large enough to amortise per-piece histograms, small enough to balance.
pub const PIECE_LEN: usize = 1 << 16;

/// One contiguous run of one source.
#[derive(Clone, Copy)]
pub struct Piece<'a, T> {
    pub data: &'a [T],
}

pub fn split<'a, T>(sources: &[&'a [T]]) -> Vec<Piece<'a, T>> {
    let mut pieces = Vec::new();
    for src in sources {
        for chunk in src.chunks(PIECE_LEN) {
            pieces.push(Piece { data: chunk });
        }
    }
    pieces
}

/// Pair every input piece with the matching piece of its output buffer.
pub fn split_with_out<'a, 'b, T, O>(
    sources: &[&'a [T]],
    outs: &'b mut [&mut [O]],
) -> Vec<(&'a [T], &'b mut [O])> {
    let mut pairs = Vec::new();
    for (src, out) in sources.iter().zip(outs.iter_mut()) {
        for (s, o) in src.chunks(PIECE_LEN).zip(out.chunks_mut(PIECE_LEN)) {
            pairs.push((s, o));
        }
    }
    pairs
}

pub fn total_len<T>(sources: &[&[T]]) -> u64 {
    sources.iter().map(|s| s.len() as u64).sum()
}
