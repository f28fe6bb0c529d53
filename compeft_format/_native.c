/*
 * compeft_format._native: single-pass decoders for the position codings (spec 4.7) and the
 * ternary encoding (spec 4.2) on the CPU, and the Golomb encoder. On x86-64 the decoders are
 * also compiled for BMI2 and for AVX-512, and the widest set the CPU runs is used.
 *
 * The module is optional: compeft_format decodes with torch operations when it is not built,
 * and on every non-CPU device. Both paths accept and refuse the same streams.
 *
 * Every input is untrusted. Each read is bounded by the buffer it comes from, each write by the
 * output it goes to, and every loop by the length of a stream or a declared count. A defect is
 * reported as ValueError("<message>"); the Python side turns it into StreamCorrupt.
 *
 * Bit order is that of spec 4.1: element i is bit i % 8 of byte i / 8.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) || defined(__clang__)
#define CTZ64(x) ((int)__builtin_ctzll(x))
#define POPCOUNT64(x) ((int64_t)__builtin_popcountll(x))
#define CLZ64(x) ((int)__builtin_clzll(x))
#define ALWAYS_INLINE static inline __attribute__((always_inline))
#else
static int CTZ64(uint64_t x) { int n = 0; while (!(x & 1)) { x >>= 1; n++; } return n; }
static int64_t POPCOUNT64(uint64_t x) { int64_t n = 0; while (x) { x &= x - 1; n++; } return n; }
static int CLZ64(uint64_t x) { int n = 0; while (!(x >> 63)) { x <<= 1; n++; } return n; }
#define ALWAYS_INLINE static inline
#endif

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define LE64(x) __builtin_bswap64(x)
#else
#define LE64(x) (x)
#endif

typedef struct {
    const uint8_t *p;
    int64_t n; /* bytes */
} span_t;

/* Little-endian 64-bit word starting at byte `at`; bytes past the end read as zero. */
ALWAYS_INLINE uint64_t word_at(span_t s, int64_t at) {
    uint64_t w = 0;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    if (at + 8 <= s.n) {
        memcpy(&w, s.p + at, 8);
        return w;
    }
#endif
    for (int j = 0; j < 8 && at + j < s.n; j++) w |= (uint64_t)s.p[at + j] << (8 * j);
    return w;
}

/* 56 bits (at least) starting at bit `bit`. */
ALWAYS_INLINE uint64_t bits_at(span_t s, int64_t bit) { return word_at(s, bit >> 3) >> (bit & 7); }

ALWAYS_INLINE int bit_of(span_t s, int64_t bit) { return (s.p[bit >> 3] >> (bit & 7)) & 1; }

ALWAYS_INLINE void put(uint8_t *out, int64_t i, const uint8_t *level, int es) {
    switch (es) {
    case 2: memcpy(out + 2 * i, level, 2); break;
    case 4: memcpy(out + 4 * i, level, 4); break;
    default: memcpy(out + (int64_t)es * i, level, (size_t)es); break;
    }
}

/* Background (level 0) into out[a, b). */
ALWAYS_INLINE void fill(uint8_t *out, int64_t a, int64_t b, const uint8_t *level, int es) {
    if (b <= a) return;
    int zero = 1;
    for (int i = 0; i < es; i++) zero &= level[i] == 0;
    if (zero) {
        memset(out + a * es, 0, (size_t)((b - a) * es));
    } else if (es == 2) {
        uint16_t v;
        memcpy(&v, level, 2);
        for (int64_t i = a; i < b; i++) memcpy(out + 2 * i, &v, 2);
    } else {
        uint32_t v;
        memcpy(&v, level, 4);
        for (int64_t i = a; i < b; i++) memcpy(out + 4 * i, &v, 4);
    }
}

/* Elements filled with the background ahead of the writes, so that each block is written while
   it is in cache. */
#define FILL_BLOCK 4096

/* Spare zero bytes the Golomb decoders need after the remainder and extra-bit streams. */
#define PAD 8

static int bit_length(uint64_t v) {
    int n = 0;
    while (v) { n++; v >>= 1; }
    return n;
}

/* Per-member inputs shared by the decoders. */
typedef struct {
    int64_t count;
    const int64_t *numel, *nnz, *m;
    uint8_t **out;         /* ternary: output buffer of member j, or NULL when not selected */
    const uint8_t *levels; /* ternary: three levels (background, +, -) of es bytes per member */
    int es;
    int64_t *positions;    /* positions mode: member-local position of every entry */
    span_t signs;
} members_t;

/* Codes decoded per block: the sign and extra-bit words read once per block hold at least 57
   bits, and the unary stream's 16 spare bytes hold more 1 bits than one block consumes. */
#define GBLOCK 56

/* Spare bytes of 0xFF the Golomb decoders need after the unary stream. */
#define UNARY_PAD 16

ALWAYS_INLINE uint64_t load64(const uint8_t *p) {
    uint64_t w;
    memcpy(&w, p, 8);
    return LE64(w);
}

/* Position in the group's streams, carried from block to block and member to member. */
typedef struct {
    const uint8_t *next; /* next unread word of the unary stream */
    uint64_t cur;        /* unread bits of the current unary word */
    int64_t word_bit;    /* stream bit index of the current word's bit 0 */
    int64_t last_one;    /* stream bit index of the last 1 bit consumed; -1 before the first */
    int64_t fbit, xbit;  /* next remainder field and next extra bit */
} gpos_t;

/* Stream bit index of each of the next `cnt` 1 bits of the unary stream into ones[0 .. cnt).
   ones needs 7 spare entries: a whole word's bits are taken eight at a time. */
ALWAYS_INLINE void unary_ones(gpos_t *g, int64_t cnt, int64_t *ones) {
    const uint8_t *next = g->next;
    uint64_t cur = g->cur;
    int64_t wb = g->word_bit, c = 0;
    while (c < cnt) {
        while (!cur) {
            cur = load64(next);
            next += 8;
            wb += 64;
        }
        const int64_t pc = POPCOUNT64(cur);
        if (pc <= cnt - c) { /* every 1 bit of the word: no branch per bit */
            int64_t *o = ones + c;
            const int64_t *const end = o + pc;
            do {
                for (int t = 0; t < 8; t++) {
                    o[t] = wb + CTZ64(cur | ((uint64_t)1 << 63)); /* past the last: ignored */
                    cur &= cur - 1;
                }
                o += 8;
            } while (o < end);
            c += pc;
            cur = 0;
        } else {
            for (; c < cnt; c++) {
                ones[c] = wb + CTZ64(cur);
                cur &= cur - 1;
            }
        }
    }
    g->next = next;
    g->cur = cur;
    g->word_bit = wb;
}

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_AVX512_BUILD 1
#define TARGET_AVX512 __attribute__((target("avx512f,avx512dq,popcnt,bmi,bmi2")))

/* Eight codes at once (fields of w <= 7 bits, all in fw): positions into loc[0 .. 8), given
   ones[-1 .. 8) and the position before them; returns the last position. */
TARGET_AVX512 static inline int64_t golomb8_avx512(const int64_t *ones, uint64_t fw, int w, uint64_t fmask_s,
                                                   int64_t u_s, int64_t m_s, uint64_t *xw, int64_t p, int64_t *loc) {
    const __m512i iota = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0), one = _mm512_set1_epi64(1), zero = _mm512_setzero_si512();
    const __m512i shifts = _mm512_mullo_epi64(iota, _mm512_set1_epi64(w)), fmask = _mm512_set1_epi64((int64_t)fmask_s);
    const __m512i u = _mm512_set1_epi64(u_s), m = _mm512_set1_epi64(m_s);
    __m512i x = _mm512_and_si512(_mm512_srlv_epi64(_mm512_set1_epi64((int64_t)fw), shifts), fmask);
    const __mmask8 need = _mm512_cmpge_epi64_mask(x, u);
    const uint64_t e = _pdep_u64(*xw, need); /* the extra bits, moved to the codes that take one */
    *xw >>= __builtin_popcount(need);
    const __m512i ev = _mm512_and_si512(_mm512_srlv_epi64(_mm512_set1_epi64((int64_t)e), iota), one);
    x = _mm512_mask_add_epi64(x, need, x, _mm512_sub_epi64(_mm512_add_epi64(x, ev), u));
    const __m512i o = _mm512_loadu_si512(ones), op = _mm512_loadu_si512(ones - 1);
    __m512i gap = _mm512_add_epi64(_mm512_mullo_epi64(_mm512_sub_epi64(o, op), m), _mm512_add_epi64(x, _mm512_sub_epi64(one, m)));
    gap = _mm512_add_epi64(gap, _mm512_alignr_epi64(gap, zero, 7)); /* inclusive prefix sum */
    gap = _mm512_add_epi64(gap, _mm512_alignr_epi64(gap, zero, 6));
    gap = _mm512_add_epi64(gap, _mm512_alignr_epi64(gap, zero, 4));
    _mm512_storeu_si512(loc, _mm512_add_epi64(gap, _mm512_set1_epi64(p)));
    return loc[7];
}
#endif

/*
 * Golomb codes of a whole group (spec 4.7.2). With `positions`, every entry's member-local
 * position is stored; otherwise the selected members' outputs get their levels at each position.
 * Returns NULL or an error message; *extra_used receives the extra bits consumed.
 *
 * Codes are decoded in blocks of GBLOCK: first the block's unary 1 bits, then its remainders,
 * extra bits and positions. A position is p = p_prev + q*m + r + 1 with q the 0 bits between
 * consecutive 1 bits. Checks are made per block and are exact: the block's quotients add up to
 * at most qmax (else some position is past the member's end), and its last position, the
 * largest, lies within the member. A block that provably ends within the member (the bound
 * p_prev + (sum q + cnt) * m) has its background filled first; the scalar code then writes its
 * levels while decoding. Other blocks, and the eight-wide code (`vec`), keep the block's
 * positions and write them once the block has passed its checks.
 */
ALWAYS_INLINE const char *golomb_walk(span_t un, span_t rem, span_t ext, const members_t *mb,
                                      int es, int with_positions, int vec, int64_t *extra_used) {
    /* un ends in UNARY_PAD bytes of 0xFF, rem and ext in PAD zero bytes (checked by the callers);
       the lengths below exclude them */
    const int64_t ubits = 8 * un.n, xbits = (ext.n - PAD) * 8, fbits = (rem.n - PAD) * 8;
    const uint8_t *const remp = rem.p;
    gpos_t g = {un.p + 8, load64(un.p), 0, -1, 0, 0};
    int64_t ones_at[GBLOCK + 9], loc[GBLOCK];
    int64_t *const ones = ones_at + 1; /* ones[-1]: the 1 bit before the block */
    int64_t entry = 0;
    for (int64_t j = 0; j < mb->count; j++) {
        const int64_t k = mb->nnz[j], n = mb->numel[j], m = mb->m[j];
        uint8_t *const out = with_positions ? NULL : mb->out[j];
        const uint8_t *const lv = with_positions ? NULL : mb->levels + 3 * (int64_t)es * j;
        if (k == 0) {
            if (out) fill(out, 0, n, lv, es);
            continue;
        }
        const int w = m > 1 ? bit_length((uint64_t)(m - 1)) - 1 : 0;
        const int64_t u = m > 1 ? ((int64_t)1 << (w + 1)) - m : INT64_MAX; /* m = 1: no extra bits */
        const uint64_t fmask = ((uint64_t)1 << w) - 1;
        const int64_t qmax = n / m; /* a larger quotient is a gap past the member's end */
        if (g.fbit + k * (int64_t)w > fbits) return "remainder stream is shorter than the codes require";
        int64_t p = -1, filled = 0;
        for (int64_t i = 0; i < k; i += GBLOCK) {
            const int64_t cnt = k - i < GBLOCK ? k - i : GBLOCK;
            unary_ones(&g, cnt, ones);
            const int64_t prev = g.last_one;
            ones[-1] = prev;
            g.last_one = ones[cnt - 1];
            /* the sentinel bytes hold 1 bits: a code found there is one the stream lacks */
            if (g.last_one >= ubits) return "unary stream holds fewer codes than the manifest declares";
            if (g.last_one - prev - cnt > qmax) return "a Golomb quotient describes a gap past the end of its tensor";
            if (g.xbit > xbits) return "extra-bit stream is shorter than the remainders require";
            const int64_t bound = p + (g.last_one - prev) * m; /* no overflow: (qmax + cnt) * m */
            const int direct = out && bound < n;
            if (direct && bound >= filled) {
                const int64_t upto = (bound / FILL_BLOCK + 1) * FILL_BLOCK;
                fill(out, filled, upto < n ? upto : n, lv, es);
                filled = upto;
            }
            uint64_t sw = out ? bits_at(mb->signs, entry + i) : 0;
            /* extra bits, with a marker bit above the 56 taken: what is shifted out is consumed */
            uint64_t xw = (bits_at(ext, g.xbit) & (((uint64_t)1 << 56) - 1)) | ((uint64_t)1 << 56);
            /* p = (ones[b] - prev) * m + s, with s the block's p_prev plus sum(r + 1 - m) */
            int64_t fbit = g.fbit, s = p;
            const int64_t step = 1 - m;
            /* One code: truncated binary (fields at or above u take an extra bit; branch-free,
               the outcome is close to a coin toss), then the position. x < m afterwards. */
#define GOLOMB_CODE(field, b, SINK)                                   \
            {                                                         \
                int64_t x = (int64_t)(field);                         \
                const int64_t need = x >= u;                          \
                x += need * (x + (int64_t)(xw & 1) - u);              \
                xw >>= need;                                          \
                s += x + step;                                        \
                p = (ones[b] - prev) * m + s;                         \
                SINK;                                                 \
            }
#define TO_OUT(b) put(out, p, lv + (int64_t)es * (1 + (sw & 1)), es); sw >>= 1
#define TO_LOC(b) loc[b] = p
            /* fields of up to 7 bits: eight from one 64-bit read */
#define GOLOMB_CODES(SINK)                                                            \
            {                                                                         \
                int64_t b = 0;                                                        \
                if (w <= 7)                                                           \
                    for (; b + 8 <= cnt; b += 8) {                                    \
                        uint64_t fw = load64(remp + (fbit >> 3)) >> (fbit & 7);       \
                        fbit += 8 * w;                                                \
                        for (int t = 0; t < 8; t++) {                                 \
                            GOLOMB_CODE(fw & fmask, b + t, SINK(b + t));              \
                            fw >>= w;                                                 \
                        }                                                             \
                    }                                                                 \
                for (; b < cnt; b++) {                                                \
                    GOLOMB_CODE((load64(remp + (fbit >> 3)) >> (fbit & 7)) & fmask, b, SINK(b)); \
                    fbit += w;                                                        \
                }                                                                     \
            }
#ifdef HAVE_AVX512_BUILD
            if (vec) {
                int64_t b = 0;
                if (w <= 7)
                    for (; b + 8 <= cnt; b += 8) {
                        const uint64_t fw = load64(remp + (fbit >> 3)) >> (fbit & 7);
                        fbit += 8 * w;
                        p = golomb8_avx512(ones + b, fw, w, fmask, u, m, &xw, p, loc + b);
                    }
                s = p - (ones[b - 1] - prev) * m;
                for (; b < cnt; b++) {
                    GOLOMB_CODE((load64(remp + (fbit >> 3)) >> (fbit & 7)) & fmask, b, TO_LOC(b));
                    fbit += w;
                }
            } else
#endif
            if (direct)
                GOLOMB_CODES(TO_OUT)
            else
                GOLOMB_CODES(TO_LOC)
#undef GOLOMB_CODES
#undef TO_LOC
#undef TO_OUT
#undef GOLOMB_CODE
            g.fbit = fbit;
            g.xbit += 56 - (63 - CLZ64(xw));
            if (p >= n) return "a decoded position is beyond the end of its tensor";
            if (direct && !vec) continue;
            if (with_positions) {
                memcpy(mb->positions + entry + i, loc, (size_t)cnt * sizeof(int64_t));
            } else if (out) {
                if (p >= filled) {
                    const int64_t upto = (p / FILL_BLOCK + 1) * FILL_BLOCK;
                    fill(out, filled, upto < n ? upto : n, lv, es);
                    filled = upto;
                }
                for (int64_t b = 0; b < cnt; b++) {
                    put(out, loc[b], lv + (int64_t)es * (1 + (sw & 1)), es);
                    sw >>= 1;
                }
            }
        }
        if (out) fill(out, filled, n, lv, es);
        entry += k;
    }
    if (g.xbit > xbits) return "extra-bit stream is shorter than the remainders require";
    /* the last code's 1 bit lies in the last byte, and no 1 bit follows it */
    if (entry == 0 ? un.n != 0
                   : (g.last_one >> 3) != un.n - 1 || (un.p[un.n - 1] >> ((g.last_one & 7) + 1)) != 0)
        return "unary stream has bits after its last code";
    *extra_used = g.xbit;
    return NULL;
}

/* Number of 1 bits among bits [a, a + n) of s. */
static int64_t count_range(span_t s, int64_t a, int64_t n) {
    int64_t c = 0, off = 0;
    while (off < n) {
        const int64_t take = n - off < 56 ? n - off : 56;
        c += POPCOUNT64(bits_at(s, a + off) & (((uint64_t)1 << take) - 1));
        off += take;
    }
    return c;
}

/*
 * Position bit-plane of a group (spec 4.7.1) into the selected members' outputs. Checks, as the
 * torch path does, that each selected member holds its declared count and that the entries
 * before it add up to the declared ones.
 */
ALWAYS_INLINE const char *bitmap_walk(span_t bm, const members_t *mb, int es) {
    int64_t bit = 0, entry = 0, declared = 0, total = 0;
    for (int64_t j = 0; j < mb->count; j++) total += mb->nnz[j];
    for (int64_t j = 0; j < mb->count; j++) {
        const int64_t n = mb->numel[j];
        uint8_t *out = mb->out[j];
        if (!out) {
            entry += count_range(bm, bit, n);
        } else {
            if (entry != declared) return "position bit-plane disagrees with nnz";
            const uint8_t *lv = mb->levels + 3 * (int64_t)es * j;
            const int64_t start = entry;
            int64_t off = 0;
            while (off < n) {
                const int64_t take = n - off < 56 ? n - off : 56;
                uint64_t word = bits_at(bm, bit + off) & (((uint64_t)1 << take) - 1);
                if (entry + POPCOUNT64(word) > total) return "position bit-plane disagrees with nnz";
                fill(out, off, off + take, lv, es);
                while (word) {
                    put(out, off + CTZ64(word), lv + (int64_t)es * (1 + bit_of(mb->signs, entry)), es);
                    entry++;
                    word &= word - 1;
                }
                off += take;
            }
            if (entry - start != mb->nnz[j]) return "position bit-plane disagrees with nnz";
        }
        bit += n;
        declared += mb->nnz[j];
    }
    return NULL;
}

/* ---- instruction sets --------------------------------------------------------------------- */

/* The walkers are compiled three times on x86-64: for the baseline instruction set; with POPCNT,
   BMI1 and BMI2 (one-instruction population counts, trailing-zero counts, shifts and bit
   deposits); and with AVX-512 F and DQ on top, which decodes eight Golomb codes per step. The
   module picks the widest the CPU reports at import. All produce the same results. */
#define WALKERS(suffix, vec, attr)                                                                  \
    attr static const char *golomb_##suffix(span_t un, span_t rem, span_t ext, const members_t *mb, \
                                            int es, int with_positions, int64_t *used) {           \
        if (with_positions) return golomb_walk(un, rem, ext, mb, 2, 1, vec, used);                 \
        return es == 2 ? golomb_walk(un, rem, ext, mb, 2, 0, vec, used)                           \
                       : golomb_walk(un, rem, ext, mb, 4, 0, vec, used);                          \
    }                                                                                              \
    attr static const char *bitmap_##suffix(span_t bm, const members_t *mb, int es) {              \
        return es == 2 ? bitmap_walk(bm, mb, 2) : bitmap_walk(bm, mb, 4);                         \
    }

WALKERS(generic, 0, )

enum { ISA_GENERIC, ISA_BMI2, ISA_AVX512 };
static const char *const isa_names[] = {"generic", "bmi2", "avx512"};

#ifdef HAVE_AVX512_BUILD
WALKERS(bmi2, 0, __attribute__((target("popcnt,bmi,bmi2"))))
WALKERS(avx512, 1, TARGET_AVX512)

/* The widest instruction set this CPU runs. */
static int cpu_isa(void) {
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("popcnt") && __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2")))
        return ISA_GENERIC;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")) return ISA_AVX512;
    return ISA_BMI2;
}
#else
static int cpu_isa(void) { return ISA_GENERIC; }
#endif

static int use_isa = ISA_GENERIC;

static const char *golomb_run(span_t un, span_t rem, span_t ext, const members_t *mb, int es, int with_positions,
                              int64_t *used) {
#ifdef HAVE_AVX512_BUILD
    if (use_isa == ISA_AVX512) return golomb_avx512(un, rem, ext, mb, es, with_positions, used);
    if (use_isa == ISA_BMI2) return golomb_bmi2(un, rem, ext, mb, es, with_positions, used);
#endif
    return golomb_generic(un, rem, ext, mb, es, with_positions, used);
}

static const char *bitmap_run(span_t bm, const members_t *mb, int es) {
#ifdef HAVE_AVX512_BUILD
    if (use_isa == ISA_AVX512) return bitmap_avx512(bm, mb, es);
    if (use_isa == ISA_BMI2) return bitmap_bmi2(bm, mb, es);
#endif
    return bitmap_generic(bm, mb, es);
}

/* ---- argument handling ------------------------------------------------------------------ */

typedef struct {
    Py_buffer views[12];
    int used;
    Py_buffer *outs;
    Py_ssize_t nouts;
    uint8_t **out_ptrs;
    int64_t *counts; /* private copies of numel, nnz and m, checked once */
    PyObject *out_items; /* tuple copy of the outs list */
} buffers_t;

static void release(buffers_t *b) {
    for (int i = 0; i < b->used; i++) PyBuffer_Release(&b->views[i]);
    if (b->outs) {
        for (Py_ssize_t i = 0; i < b->nouts; i++)
            if (b->outs[i].obj) PyBuffer_Release(&b->outs[i]);
        PyMem_Free(b->outs);
    }
    PyMem_Free(b->out_ptrs);
    PyMem_Free(b->counts);
    Py_XDECREF(b->out_items);
}

static int get_view(buffers_t *b, PyObject *obj, span_t *s) {
    Py_buffer *v = &b->views[b->used];
    if (PyObject_GetBuffer(obj, v, PyBUF_C_CONTIGUOUS) < 0) return -1;
    b->used++;
    s->p = (const uint8_t *)v->buf;
    s->n = (int64_t)v->len;
    return 0;
}

/* A writable C-contiguous buffer, released with the others. */
static int get_writable(buffers_t *b, PyObject *obj, uint8_t **p, int64_t *n) {
    Py_buffer *v = &b->views[b->used];
    if (PyObject_GetBuffer(obj, v, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return -1;
    b->used++;
    *p = (uint8_t *)v->buf;
    *n = (int64_t)v->len;
    return 0;
}

/* Upper bound on a group's total elements (the format's limit is 2^36 per group). */
#define MAX_GROUP_ELEMENTS ((int64_t)1 << 40)

/* numel, nnz and (unless NULL) m: int64 arrays of one length, copied (so that the caller cannot
 * change them once checked) and checked for the values a decoder relies on: counts within
 * 0 <= nnz <= numel, group totals within MAX_GROUP_ELEMENTS, 1 <= m <= max(numel, 1). */
static int get_members(buffers_t *b, PyObject *numel, PyObject *nnz, PyObject *m, members_t *mb) {
    span_t a, c, d = {0};
    if (get_view(b, numel, &a) || get_view(b, nnz, &c) || (m && get_view(b, m, &d))) return -1;
    if (a.n % 8 || a.n != c.n || (m && a.n != d.n)) {
        PyErr_SetString(PyExc_TypeError, "numel, nnz and m must be int64 arrays of one length");
        return -1;
    }
    const int64_t count = a.n / 8;
    b->counts = PyMem_Malloc((size_t)(3 * (count ? count : 1)) * sizeof(int64_t));
    if (!b->counts) {
        PyErr_NoMemory();
        return -1;
    }
    int64_t *own = b->counts;
    memcpy(own, a.p, (size_t)a.n);
    memcpy(own + count, c.p, (size_t)c.n);
    if (m) memcpy(own + 2 * count, d.p, (size_t)d.n);
    mb->count = count;
    mb->numel = own;
    mb->nnz = own + count;
    mb->m = m ? own + 2 * count : NULL;
    int64_t elements = 0;
    for (int64_t j = 0; j < count; j++) {
        const int64_t n = mb->numel[j], k = mb->nnz[j];
        if (n < 0 || k < 0 || k > n || n > MAX_GROUP_ELEMENTS - elements ||
            (m && (mb->m[j] < 1 || mb->m[j] > (n > 1 ? n : 1)))) {
            PyErr_SetString(PyExc_ValueError, "member counts out of range");
            return -1;
        }
        elements += n;
    }
    return 0;
}

/* Sum of nnz; at most MAX_GROUP_ELEMENTS once get_members has accepted the counts. */
static int64_t total_nnz(const members_t *mb) {
    int64_t t = 0;
    for (int64_t j = 0; j < mb->count; j++) t += mb->nnz[j];
    return t;
}

/* outs: a list with one writable buffer (or None) per member; levels: bytes. */
static int get_outputs(buffers_t *b, PyObject *outs, PyObject *levels, PyObject *signs, int es,
                       members_t *mb) {
    if (es != 2 && es != 4) {
        PyErr_SetString(PyExc_TypeError, "element size must be 2 or 4");
        return -1;
    }
    if (!PyList_Check(outs) || PyList_GET_SIZE(outs) != mb->count) {
        PyErr_SetString(PyExc_TypeError, "outs must be a list with one entry per member");
        return -1;
    }
    b->out_items = PyList_AsTuple(outs); /* a buffer export cannot change it under the loop */
    if (!b->out_items) return -1;
    span_t lv;
    if (get_view(b, levels, &lv) || get_view(b, signs, &mb->signs)) return -1;
    if (lv.n != 3 * (int64_t)es * mb->count) {
        PyErr_SetString(PyExc_TypeError, "levels must hold three values per member");
        return -1;
    }
    mb->levels = lv.p;
    mb->es = es;
    if (mb->signs.n * 8 < total_nnz(mb)) {
        PyErr_SetString(PyExc_ValueError, "sign stream is shorter than the entries");
        return -1;
    }
    b->nouts = mb->count;
    b->outs = PyMem_Calloc((size_t)(mb->count ? mb->count : 1), sizeof(Py_buffer));
    b->out_ptrs = PyMem_Calloc((size_t)(mb->count ? mb->count : 1), sizeof(uint8_t *));
    if (!b->outs || !b->out_ptrs) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t j = 0; j < mb->count; j++) {
        PyObject *o = PyTuple_GET_ITEM(b->out_items, j);
        if (o == Py_None) continue;
        if (PyObject_GetBuffer(o, &b->outs[j], PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return -1;
        if ((int64_t)b->outs[j].len != mb->numel[j] * es) {
            PyErr_SetString(PyExc_TypeError, "an output buffer does not match its member's size");
            return -1;
        }
        b->out_ptrs[j] = (uint8_t *)b->outs[j].buf;
    }
    mb->out = b->out_ptrs;
    return 0;
}

/* The unary stream must end in UNARY_PAD bytes of 0xFF, the remainder and extra-bit streams in
   PAD spare bytes; the spans are shortened to the streams themselves. */
static int check_padded(span_t *un, span_t rem, span_t ext) {
    int ok = un->n >= UNARY_PAD && rem.n >= PAD && ext.n >= PAD;
    for (int i = 1; ok && i <= UNARY_PAD; i++) ok = un->p[un->n - i] == 0xFF;
    if (!ok) {
        PyErr_SetString(PyExc_TypeError, "unary needs 16 spare 0xFF bytes, remainders and extra 8 spare bytes");
        return -1;
    }
    un->n -= UNARY_PAD;
    return 0;
}

static PyObject *finish(buffers_t *b, const char *err, PyObject *result) {
    release(b);
    if (err) {
        Py_XDECREF(result);
        PyErr_SetString(PyExc_ValueError, err);
        return NULL;
    }
    return result;
}

PyDoc_STRVAR(golomb_ternary_doc,
"golomb_ternary(unary, remainders, extra, signs, numel, nnz, m, outs, levels, es) -> extra bits used\n\n"
"Decode a ternary group's Golomb codes into the selected members' outputs: the background level\n"
"everywhere, the + or - level at each kept position (levels: three values of es bytes per member).\n"
"outs holds a writable buffer or None per member. unary is the stream followed by 16 bytes of 0xFF,\n"
"remainders and extra are the streams followed by 8 zero bytes.");

static PyObject *golomb_ternary(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *un_o, *rem_o, *ext_o, *sg_o, *numel_o, *nnz_o, *m_o, *outs_o, *lv_o;
    int es;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOi", &un_o, &rem_o, &ext_o, &sg_o, &numel_o, &nnz_o, &m_o,
                          &outs_o, &lv_o, &es))
        return NULL;
    buffers_t b = {0};
    span_t un, rem, ext;
    members_t mb = {0};
    if (get_view(&b, un_o, &un) || get_view(&b, rem_o, &rem) || get_view(&b, ext_o, &ext) ||
        get_members(&b, numel_o, nnz_o, m_o, &mb) || get_outputs(&b, outs_o, lv_o, sg_o, es, &mb) ||
        check_padded(&un, rem, ext)) {
        release(&b);
        return NULL;
    }
    int64_t used = 0;
    const char *err;
    Py_BEGIN_ALLOW_THREADS
    err = golomb_run(un, rem, ext, &mb, es, 0, &used);
    Py_END_ALLOW_THREADS
    return finish(&b, err, err ? NULL : PyLong_FromLongLong(used));
}

PyDoc_STRVAR(golomb_positions_doc,
"golomb_positions(unary, remainders, extra, numel, nnz, m, positions) -> extra bits used\n\n"
"Decode a group's Golomb codes into positions (a writable int64 buffer, one entry per code):\n"
"each entry's position within its member. The streams are padded as golomb_ternary's are.");

static PyObject *golomb_positions(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *un_o, *rem_o, *ext_o, *numel_o, *nnz_o, *m_o, *pos_o;
    if (!PyArg_ParseTuple(args, "OOOOOOO", &un_o, &rem_o, &ext_o, &numel_o, &nnz_o, &m_o, &pos_o))
        return NULL;
    buffers_t b = {0};
    span_t un, rem, ext;
    members_t mb = {0};
    if (get_view(&b, un_o, &un) || get_view(&b, rem_o, &rem) || get_view(&b, ext_o, &ext) ||
        get_members(&b, numel_o, nnz_o, m_o, &mb) || check_padded(&un, rem, ext)) {
        release(&b);
        return NULL;
    }
    uint8_t *pos;
    int64_t pos_bytes;
    if (get_writable(&b, pos_o, &pos, &pos_bytes)) {
        release(&b);
        return NULL;
    }
    if (pos_bytes != 8 * total_nnz(&mb)) {
        release(&b);
        PyErr_SetString(PyExc_TypeError, "positions must be an int64 buffer with one entry per code");
        return NULL;
    }
    mb.positions = (int64_t *)pos;
    int64_t used = 0;
    const char *err;
    Py_BEGIN_ALLOW_THREADS
    err = golomb_run(un, rem, ext, &mb, 2, 1, &used);
    Py_END_ALLOW_THREADS
    return finish(&b, err, err ? NULL : PyLong_FromLongLong(used));
}

PyDoc_STRVAR(bitmap_ternary_doc,
"bitmap_ternary(positions, signs, numel, nnz, outs, levels, es) -> None\n\n"
"Decode a ternary group's position bit-plane into the selected members' outputs, as\n"
"golomb_ternary does.");

static PyObject *bitmap_ternary(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *bm_o, *sg_o, *numel_o, *nnz_o, *outs_o, *lv_o;
    int es;
    if (!PyArg_ParseTuple(args, "OOOOOOi", &bm_o, &sg_o, &numel_o, &nnz_o, &outs_o, &lv_o, &es)) return NULL;
    buffers_t b = {0};
    span_t bm;
    members_t mb = {0};
    if (get_view(&b, bm_o, &bm) || get_members(&b, numel_o, nnz_o, NULL, &mb) ||
        get_outputs(&b, outs_o, lv_o, sg_o, es, &mb)) {
        release(&b);
        return NULL;
    }
    int64_t need = 0;
    for (int64_t j = 0; j < mb.count; j++) need += mb.numel[j];
    if (bm.n * 8 < need) {
        release(&b);
        PyErr_SetString(PyExc_ValueError, "position bit-plane is shorter than the group");
        return NULL;
    }
    const char *err;
    Py_BEGIN_ALLOW_THREADS
    err = bitmap_run(bm, &mb, es);
    Py_END_ALLOW_THREADS
    if (err) return finish(&b, err, NULL);
    Py_INCREF(Py_None);
    return finish(&b, NULL, Py_None);
}

/* ---- encoding --------------------------------------------------------------------------- */

ALWAYS_INLINE void set_bit(uint8_t *buf, int64_t bit) { buf[bit >> 3] |= (uint8_t)(1u << (bit & 7)); }

/*
 * Golomb codes of a group (spec 4.7.2) from each member's sorted kept indices. The outputs are
 * zeroed buffers: unary of at least (sum numel + sum nnz + 7) / 8 bytes, remainders of the field
 * bytes plus 8 spare ones, extra of at least (sum nnz + 7) / 8 bytes.
 */
static const char *golomb_encode_walk(const int64_t *idx, const members_t *mb, uint8_t *un, int64_t un_bits,
                                      uint8_t *rem, int64_t rem_bits, uint8_t *ext, int64_t ext_bits,
                                      int64_t *un_used, int64_t *ext_used) {
    int64_t ubit = 0, fbit = 0, xbit = 0, e = 0;
    for (int64_t j = 0; j < mb->count; j++) {
        const int64_t k = mb->nnz[j], n = mb->numel[j], m = mb->m[j];
        const int w = m > 1 ? bit_length((uint64_t)(m - 1)) - 1 : 0;
        const int64_t u = m > 1 ? ((int64_t)1 << (w + 1)) - m : 0;
        int64_t prev = -1;
        for (int64_t i = 0; i < k; i++, e++) {
            const int64_t at = idx[e];
            if (at <= prev || at >= n) return "kept indices must increase and lie within their tensor";
            const uint64_t gap = (uint64_t)(at - prev - 1);
            prev = at;
            int64_t q, r;
            if (gap >> 32 == 0 && m >> 32 == 0) { /* 32-bit division is several times cheaper */
                q = (uint32_t)gap / (uint32_t)m;
                r = (uint32_t)gap - (uint32_t)q * (uint32_t)m;
            } else {
                q = (int64_t)(gap / (uint64_t)m);
                r = (int64_t)(gap % (uint64_t)m);
            }
            ubit += q;
            if (ubit >= un_bits) return "unary stream overflows its buffer";
            set_bit(un, ubit++);
            if (m == 1) continue;
            /* branch-free: whether the extra bit is needed is close to a coin toss */
            const int64_t big = r >= u;
            const uint64_t x = (uint64_t)(big ? (r + u) >> 1 : r);
            if (fbit + w > rem_bits || xbit >= ext_bits) return "a stream overflows its buffer";
            uint64_t word;
            memcpy(&word, rem + (fbit >> 3), 8); /* rem has 8 spare bytes past its fields */
            word |= LE64(x << (fbit & 7));
            memcpy(rem + (fbit >> 3), &word, 8);
            fbit += w;
            ext[xbit >> 3] |= (uint8_t)((big & (r + u) & 1) << (xbit & 7));
            xbit += big;
        }
    }
    *un_used = ubit;
    *ext_used = xbit;
    return NULL;
}

PyDoc_STRVAR(golomb_encode_doc,
"golomb_encode(indices, numel, nnz, m, unary, remainders, extra) -> (unary bits, extra bits)\n\n"
"Golomb-code a group's kept indices (int64, member after member, increasing within each) into\n"
"zeroed writable buffers (remainders with 8 spare bytes at the end); returns how many bits of the\n"
"unary and extra-bit streams were written.");

static PyObject *golomb_encode(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *idx_o, *numel_o, *nnz_o, *m_o, *un_o, *rem_o, *ext_o;
    if (!PyArg_ParseTuple(args, "OOOOOOO", &idx_o, &numel_o, &nnz_o, &m_o, &un_o, &rem_o, &ext_o)) return NULL;
    buffers_t b = {0};
    span_t idx;
    members_t mb = {0};
    if (get_view(&b, idx_o, &idx) || get_members(&b, numel_o, nnz_o, m_o, &mb)) {
        release(&b);
        return NULL;
    }
    if (idx.n != 8 * total_nnz(&mb)) {
        release(&b);
        PyErr_SetString(PyExc_TypeError, "indices must be int64 with one entry per kept element");
        return NULL;
    }
    uint8_t *un, *rem, *ext;
    int64_t un_n, rem_n, ext_n;
    if (get_writable(&b, un_o, &un, &un_n) || get_writable(&b, rem_o, &rem, &rem_n) ||
        get_writable(&b, ext_o, &ext, &ext_n)) {
        release(&b);
        return NULL;
    }
    if (rem_n < 8) {
        release(&b);
        PyErr_SetString(PyExc_TypeError, "the remainder buffer needs 8 spare bytes");
        return NULL;
    }
    int64_t un_used = 0, ext_used = 0;
    const char *err;
    Py_BEGIN_ALLOW_THREADS
    err = golomb_encode_walk((const int64_t *)idx.p, &mb, un, 8 * un_n, rem, 8 * (rem_n - 8), ext, 8 * ext_n,
                             &un_used, &ext_used);
    Py_END_ALLOW_THREADS
    return finish(&b, err, err ? NULL : Py_BuildValue("(LL)", (long long)un_used, (long long)ext_used));
}

PyDoc_STRVAR(isa_doc,
"isa(name=None) -> the instruction set the decoders use\n\n"
"'avx512', 'bmi2' or 'generic'; the widest the CPU runs by default. With a name, switch to it\n"
"first (ValueError if the CPU lacks it). Every choice decodes the same.");

static PyObject *isa(PyObject *self, PyObject *args) {
    (void)self;
    const char *name = NULL;
    if (!PyArg_ParseTuple(args, "|s", &name)) return NULL;
    if (name) {
        int found = -1;
        for (int i = 0; i <= ISA_AVX512; i++)
            if (strcmp(name, isa_names[i]) == 0) found = i;
        if (found < 0 || found > cpu_isa()) {
            PyErr_Format(PyExc_ValueError, "instruction set %s is not available here", name);
            return NULL;
        }
        use_isa = found;
    }
    return PyUnicode_FromString(isa_names[use_isa]);
}

static PyMethodDef methods[] = {
    {"isa", isa, METH_VARARGS, isa_doc},
    {"golomb_ternary", golomb_ternary, METH_VARARGS, golomb_ternary_doc},
    {"golomb_positions", golomb_positions, METH_VARARGS, golomb_positions_doc},
    {"bitmap_ternary", bitmap_ternary, METH_VARARGS, bitmap_ternary_doc},
    {"golomb_encode", golomb_encode, METH_VARARGS, golomb_encode_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_native",
    "Single-pass CPU coders for compeft's position codings and ternary encoding.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) {
    use_isa = cpu_isa();
    PyObject *mod = PyModule_Create(&module);
    if (!mod) return NULL;
    /* the instruction sets' names, narrowest first */
    PyObject *names = Py_BuildValue("(sss)", isa_names[ISA_GENERIC], isa_names[ISA_BMI2], isa_names[ISA_AVX512]);
    if (!names || PyModule_AddObject(mod, "ISAS", names) < 0) {
        Py_XDECREF(names);
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
