"""How the per-layer loops cut a layer into cache-sized tiles (shared by both math backends)."""

# Products summed in the compute dtype over runs of this many elements; the runs' sums are then
# added in fp64. Sequential fp32 error grows with the run length (bounded by 256 ulp, ~16 ulp
# typical), and a whole 25M-element layer never accumulates in fp32 at once.
CHUNK = 256
# Elements per tile of the Gram and merge loops (a multiple of CHUNK): the Python loop costs
# nothing and a tile's scratch stays in cache (measured best on a 2-core host).
BLOCK = 1 << 18


def tiles(rows: int, k: int):
    """``(r0, r1, c0, c1)`` tiles of a ``(rows, k)`` layer: several whole rows per tile when
    rows are short, column slices of one row when they are long."""
    row_step = max(1, BLOCK // max(k, 1))
    col_step = max(1, min(k, BLOCK))
    for r0 in range(0, rows, row_step):
        for c0 in range(0, k, col_step):
            yield r0, min(rows, r0 + row_step), c0, min(k, c0 + col_step)
