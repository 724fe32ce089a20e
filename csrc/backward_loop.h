// The loop skeleton both backward schedules share (two-pass backward.cpp, one-pass one_pass.cpp): a
// thread walks its vocab blocks in groups of kGroup (one group's dZ feeds one dH GEMM, whose longer K
// amortizes the GEMM's fp32 C traffic). Per group the schedule may prepare operands (start); per block
// it forms dZ and adds that block's dW (block); per group it adds dH (end). The bias gradient's row
// sums of a group are gathered here.
#pragma once

#include "common.h"

namespace grpo_kernels::detail {

struct VocabGroup {
  int64_t first_block, nblocks, v0, rows;
};

struct VocabBlock {
  int64_t index, in_group, v0, rows;
  float* db_rows;  // this block's bias-gradient row sums, nullptr without a bias gradient
};

template <class Start, class Block, class End>
void for_each_vocab_group(const Partition& part, int64_t tid, int64_t V, float* db, std::vector<float>& db_rows,
                          Start&& start, Block&& block, End&& end) {
  db_rows.resize(kGroup * kVocabBlock);
  for (int64_t g0 = part.begin(tid); g0 < part.end(tid); g0 += kGroup) {
    const int64_t nb = std::min(kGroup, part.end(tid) - g0);
    const int64_t v0 = g0 * kVocabBlock;
    const VocabGroup g{g0, nb, v0, std::min(nb * kVocabBlock, V - v0)};
    start(g);
    if (db) std::fill(db_rows.begin(), db_rows.end(), 0.f);
    for (int64_t bi = 0; bi < nb; ++bi) {
      const int64_t bv0 = v0 + bi * kVocabBlock;
      block(g, VocabBlock{g0 + bi, bi, bv0, std::min(kVocabBlock, V - bv0),
                          db ? db_rows.data() + bi * kVocabBlock : nullptr});
    }
    end(g);
    if (db)
      for (int64_t r = 0; r < g.rows; ++r) db[v0 + r] += db_rows[r];
  }
}

}  // namespace grpo_kernels::detail
