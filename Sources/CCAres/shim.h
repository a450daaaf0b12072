// c-ares as a Clang module (apt: libc-ares-dev; pkg-config: libcares).
#ifndef CCARES_SHIM_H
#define CCARES_SHIM_H
#include <ares.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#endif
