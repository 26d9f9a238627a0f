/* A library with an IFUNC: `pick` resolves, at relocation, to one of two implementations. */
static long pick_a(long x) { return x * 2; }
static long pick_b(long x) { return x * 2; }
static void *resolve_pick(void) { return sizeof(long) == 8 ? (void *)pick_a : (void *)pick_b; }
long pick(long x) __attribute__((ifunc("resolve_pick")));
