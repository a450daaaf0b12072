// libnghttp2 as a Clang module (apt: libnghttp2-dev; pkg-config: libnghttp2).
#ifndef CNGHTTP2_SHIM_H
#define CNGHTTP2_SHIM_H
#include <nghttp2/nghttp2.h>
#endif
