"""What a right top-k selection is, given reference scores: shared by the kernel and model tests."""
import torch

from indexcache import kernels
from indexcache.kernels import reference as ref


def assert_topk_correct(idx, scores, topk, ties=False, rtol=1e-4):
    """idx (B, T, topk) from a kernel; scores (B, T, S) fp32 from the reference (-inf invalid).
    With ties (many equal scores) any equal key is as good, so only the score test applies."""
    idx, scores = idx.cpu().long(), scores.cpu()
    B, T, _ = idx.shape
    assert idx.shape[2] == topk
    overlap_num = overlap_den = 0
    for b in range(B):
        for t in range(T):
            row, sc = idx[b, t], scores[b, t]
            n_valid = int(torch.isfinite(sc).sum())
            want = min(topk, n_valid)
            chosen = row[row >= 0]
            assert int((row == -1).sum()) == topk - want, f"row {b},{t}: wrong -1 padding"
            assert chosen.numel() == want, f"row {b},{t}: {chosen.numel()} indices, want {want}"
            assert chosen.unique().numel() == want, f"row {b},{t}: repeated indices"
            assert torch.isfinite(sc[chosen]).all(), f"row {b},{t}: picked a masked key"
            if want:
                kth = sc.topk(want).values[-1]
                tol = rtol * float(sc[torch.isfinite(sc)].abs().max()) + 1e-6
                assert float(sc[chosen].min()) >= float(kth) - tol, f"row {b},{t}: missed a better key"
                # every key clearly above the k-th (beyond the precision tolerance) must be chosen;
                # keys within tol of it may swap, and exact ties (ReLU makes many scores exactly 0)
                # may resolve either way
                clearly_better = torch.nonzero(sc > float(kth) + tol).flatten()
                assert torch.isin(clearly_better, chosen).all(), f"row {b},{t}: left out a clearly better key"
                best = set(sc.topk(want).indices.tolist())
                overlap_num += len(best & set(chosen.tolist()))
                overlap_den += want
    if not ties:
        # random continuous scores: near-threshold swaps are rare
        assert overlap_num >= 0.9 * overlap_den


class RecordedSelections:
    """Spy on kernels.indexer_topk: in "record" mode it runs the kernel and keeps every call's inputs (the
    cache rows gathered per query row, as the reference reads them) and its (B, T, topk) indices; in
    "replay" mode it returns the recorded indices, call by call, instead of selecting."""

    def __init__(self):
        self.calls, self.replaying, self.real = [], None, kernels.indexer_topk

    def __call__(self, q, k, weights, topk, q_start, kv_len, k_scale=None, k_slots=None):
        if self.replaying is not None:
            idx = self.calls[self.replaying]["idx"]
            self.replaying += 1
            assert idx.shape[:2] == q.shape[:2], "the replayed run must make the same indexer calls"
            return idx
        idx = self.real(q, k, weights, topk, q_start, kv_len, k_scale=k_scale, k_slots=k_slots)
        gathered = k if k_slots is None else k[k_slots]
        scale = k_scale if k_slots is None or k_scale is None else k_scale[k_slots]
        self.calls.append({"idx": idx.clone(), "topk": topk, "scores": ref.ref_indexer_scores(
            q, gathered, weights, q_start, kv_len, k_scale=scale)})
        return idx
