// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Symbol visibility for vattn's public API. The library is compiled with
// hidden visibility; every public class and function is marked VATTN_EXPORT
// so that a shared library built around vattn exports exactly the API.
#ifndef VATTN_EXPORT_H_
#define VATTN_EXPORT_H_

#if defined(_WIN32)
#define VATTN_EXPORT
#else
#define VATTN_EXPORT __attribute__((visibility("default")))
#endif

#endif  // VATTN_EXPORT_H_
