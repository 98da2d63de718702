// Included by the wide-ISA kernel translation units right after their
// `#pragma GCC target(...)`: g++ does not announce a pragma's instruction sets to the
// preprocessor, and the vec headers (and sleef.h) select their code by these macros, so
// they are stated here. Everything compiled under them lives in that translation unit (see
// isa_prelude.h). No include guard: each translation unit includes it once.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
