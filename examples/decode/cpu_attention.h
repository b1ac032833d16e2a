// Copyright 2026 The vattn Authors. Licensed under the Apache License 2.0.
//
// Decode attention on the CPU: reads K and V through the strides of
// DecodeArgs (contiguous or paged), fp16 / bf16 / fp32 elements, float
// accumulation, GQA; one work item per (request, KV head) spread over a
// ThreadPool. Also the float64 reference every kernel is checked against.
#ifndef VATTN_EXAMPLES_DECODE_CPU_ATTENTION_H_
#define VATTN_EXAMPLES_DECODE_CPU_ATTENTION_H_

#include <string>
#include <vector>

#include "attention.h"
#include "thread_pool.h"

namespace vdecode {

// Writes args.out for every request. All pointers are host addresses.
// Returns ValidateDecodeArgs's complaint (and writes nothing) on bad args.
std::string CpuDecodeAttention(const DecodeArgs& args, ThreadPool& pool);

// float64 attention of request `i` of args (host addresses), reading the
// same elements the kernels read: out gets num_q_heads * head_dim values.
void ReferenceDecodeAttention(const DecodeArgs& args, int i,
                              std::vector<double>* out);

// ||out - ref|| / ||ref|| over n values; +inf when out holds a NaN or an
// infinity (an element a kernel never wrote stays NaN after poisoning).
double RelativeError(const float* out, const double* ref, std::size_t n);

// Fills n floats with NaN.
void Poison(float* out, std::size_t n);

}  // namespace vdecode

#endif  // VATTN_EXAMPLES_DECODE_CPU_ATTENTION_H_
