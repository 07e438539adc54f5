"""Massive-activation statistics for the STAS paper: MAStats streams per-channel statistics over prompts, steps and
blocks (STAS Appendix A.1-A.2, Table A1; the positional split of Fig. 1e, 2a, 2b), with plots. Frame-to-frame
consistency and the other video metrics live in metrics.py.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .interventions import TokenLayout
from .video import write_figure

# ----------------------------------------------------------------------------------------------------------
# massive activations (STAS Appendix A.1-A.2, Table A1; Fig. 1e, 2a, 2b)


def classify(peaks: torch.Tensor, ratio: float = 50.0, sigmas: float = 3.0, top: int = 5) -> dict:
    """STAS A.1-A.2 on per-channel peaks (D,): MA channels have peak > ratio x the MEAN of the peaks (not the median);
    weak-MA channels peak above mu + sigmas x sigma over channels (mu = that mean) without being MA. Each listed
    channel (largest peak first) carries peak, peak-to-mean and peak-to-median (Table A1's columns)."""
    p = peaks.double().cpu()
    mean, med, sd = p.mean().item(), float(np.median(p.numpy())), p.std(correction=0).item()
    entry = lambda d: {"dim": d, "peak": p[d].item(), "peak_to_mean": p[d].item() / mean if mean > 0 else None,
                       "peak_to_median": p[d].item() / med if med > 0 else None}
    by_peak = lambda mask: [entry(int(d)) for d in sorted(torch.nonzero(mask).flatten().tolist(),
                                                          key=lambda d: -p[d].item())]  # largest first
    is_ma = p > ratio * mean
    return {"mean_peak": mean, "median_peak": med, "mu_plus_sigmas": mean + sigmas * sd, "ma": by_peak(is_ma),
            "weak_ma": by_peak((p > mean + sigmas * sd) & ~is_ma),
            "top": [entry(d) for d in torch.argsort(p, descending=True)[:top].tolist()]}

class MAStats:
    """Streaming massive-activation statistics of block outputs, per (sampling step, block), summed over prompts
    (docs/methods.md#ma-analysis).

    Use as `Guidance(capture=stats)` with `pipe.sample(..., callback=stats.next_step)`: each call
    `stats(block, h)` with h (B, L, D) adds, for every batch row (cond and uncond), in float64:
      peak[step, block, d]       the per-channel peak max_tokens |h[:, d]|             (STAS A.1)
      pos[step, block, s, d]     the mean |h[:, d]| over first-frame / boundary / interior tokens
                                 (TokenLayout.partition(p): first frame, B(p) outside it, the rest; Fig. 2a)
      profile[step, block, i]    |h[i, c]| at every token i for one channel c per block (Fig. 1e): `profile_dim`,
                                 or else the channel with the largest peak at that block's first capture.
    Memory: steps x blocks x (4 D + L) float64 numbers; no activation is stored. `report()` averages over rows.
    layout: the token layout of h (WanModel.layout(latent shape)); blocks: the block indices to record (others are
    ignored); steps: sampling steps per prompt; p: the boundary width in percent per side (STAS: 8).

    Order of the reductions. The streaming slots above average each row's per-channel peak (max over tokens, then
    mean over rows). STAS App. A.1 reads the other way: average |h| over prompts first (running sums), then take the
    max over tokens. The two differ when prompts peak at different tokens, so they can rank channels differently.
    `a1_slots` ((step, block), ...) adds the A.1 order for those slots (Table A1 reports block 15, step 5; both are
    0-based here): a running sum of |h| (L, D) in float64 over the cond rows (row 0 of each capture: the uncond row
    is the same negative prompt for every prompt), reported under report()["a1"].

    Merging (`reduce`, many processes): every statistic is a float64 sum (peak, pos, profile, a1) or an integer
    count (rows, a1 rows, prompts), so summing the partial statistics of N processes gives exactly what one process
    over all prompts gives, up to the order of the float64 additions (relative differences ~1e-16); the maxima
    (per-row peaks, A.1's max over tokens) are taken before summing or at report time, never merged. The one choice
    that is not a sum is the profile channel picked at the first capture (prompt 0): every process must use the
    same `profile_dims` (samplers/analyze.py sets them from prompt 0); `reduce` checks that they agree.
    """

    def __init__(self, layout: TokenLayout, dim: int, blocks: Sequence[int], steps: int, p: float = 8.0,
                 profile_dim: int | None = None, a1_slots: Sequence[tuple[int, int]] = ()):
        self.layout, self.dim, self.blocks, self.steps, self.p = layout, dim, list(blocks), steps, p
        self.slot = {b: k for k, b in enumerate(self.blocks)}
        self.sets = layout.partition(p)  # first, boundary, interior: sequence indices
        weights = torch.zeros(3, layout.num_tokens, dtype=torch.float64)
        for s, idx in enumerate(self.sets):
            weights[s, idx] = 1 / max(len(idx), 1)
        self.weights = weights  # (3, L): averaging over each positional set (all-zero row for an empty set)
        s, nb = steps, len(self.blocks)
        self.peak = torch.zeros(s, nb, dim, dtype=torch.float64)
        self.pos = torch.zeros(s, nb, 3, dim, dtype=torch.float64)
        self.profile = torch.zeros(s, nb, layout.num_tokens, dtype=torch.float64)
        self.rows = torch.zeros(s, nb, dtype=torch.int64)
        self.profile_dims = [profile_dim] * nb
        self.step, self.prompts = 0, 0
        for step, block in a1_slots:
            if not (0 <= step < steps and block in self.slot):
                raise ValueError(f"A.1 slot (step {step}, block {block}) is not recorded: steps 0..{steps - 1}, "
                                 f"blocks {self.blocks}")
        self.a1 = {(s_, b): torch.zeros(layout.num_tokens, dim, dtype=torch.float64) for s_, b in a1_slots}
        self.a1_rows = dict.fromkeys(self.a1, 0)

    def next_step(self, info: dict | None = None) -> None:
        """Advance to the next sampling step (a solver callback; its info["i"] is the step just done); after the
        last step, start the next prompt at step 0."""
        self.step = (info["i"] if info is not None else self.step) + 1
        if self.step == self.steps:
            self.step, self.prompts = 0, self.prompts + 1

    @torch.no_grad()
    def __call__(self, block: int, h: torch.Tensor) -> None:
        """Accumulate the block output h (B, L, D) of block `block` at the current step."""
        if block not in self.slot:
            return
        k, s = self.slot[block], self.step
        if h.shape[1:] != (self.layout.num_tokens, self.dim):
            raise ValueError(f"block output {tuple(h.shape)} does not match the layout: expected "
                             f"(B, {self.layout.num_tokens}, {self.dim})")
        if self.profile_dims[k] is None:
            self.profile_dims[k] = int(h[0].abs().amax(dim=0).argmax())
        c = self.profile_dims[k]
        w = self.weights.to(h.device)
        for row in h.detach():
            a = row.abs().double()  # (L, D), one row at a time to bound memory
            self.peak[s, k] += a.amax(dim=0).cpu()
            self.pos[s, k] += (w @ a).cpu()  # (3, D)
            self.profile[s, k] += a[:, c].cpu()
        self.rows[s, k] += h.shape[0]
        if (s, block) in self.a1:  # STAS A.1 order: running sum of |h| over prompts (cond row), max taken at report
            self.a1[s, block] += h[0].detach().abs().double().cpu()
            self.a1_rows[s, block] += 1

    def reduce(self) -> None:
        """Sum the statistics over the ranks of the process group (minivdit.distributed; no-op in one process), in
        place, so every rank holds the totals. Raises ValueError if the ranks used different profile channels."""
        if distributed.world() == 1:
            return
        dims = torch.tensor([-1 if d is None else d for d in self.profile_dims], dtype=torch.int64)
        if not torch.equal(distributed.all_reduce(dims.clone(), "max"), -distributed.all_reduce(-dims, "max")):
            raise ValueError("ranks recorded token profiles of different channels; set profile_dims alike")
        for x in (self.peak, self.pos, self.profile, self.rows, *self.a1.values()):
            distributed.all_reduce(x)
        counts = distributed.all_reduce(torch.tensor([self.prompts, *self.a1_rows.values()], dtype=torch.int64))
        self.prompts, self.a1_rows = int(counts[0]), dict(zip(self.a1_rows, counts[1:].tolist()))

    def _mean(self, x: torch.Tensor) -> torch.Tensor:
        n = self.rows.clamp_min(1).double()
        return x / n.view(*n.shape, *[1] * (x.ndim - 2))

    def mean_peak(self) -> torch.Tensor:
        """(steps, blocks, D): the per-channel peak over tokens, averaged over captured rows."""
        return self._mean(self.peak)

    def token_profile(self, step: int, block: int) -> torch.Tensor:
        """(L,): mean |h| of the block's profile channel at every token (Fig. 1e)."""
        k = self.slot[block]
        return self.profile[step, k] / self.rows[step, k].clamp_min(1)

    def report(self, ratio: float = 50.0, sigmas: float = 3.0, top: int = 5) -> dict:
        """A JSON-able summary (STAS A.1-A.2): for every captured (step, block), the MA channels (peak > ratio x
        the mean of the per-channel peaks), weak-MA channels (peak > mu + sigmas x sigma over channels, not MA), the
        `top` largest peaks, each with peak, peak-to-mean and peak-to-median; per block, the first / boundary /
        interior means of the leading channel over steps and their ratios (Fig. 2a-b); and the summary:
        "ma_channels" (sorted: MA in at least half as many (step, block) slots as the most frequent one; [] if none)
        and a suggested "stas" {dims, block}, with "flags" for the samplers (block: the first block from which the
        leading MA channel is MA at >= half of the steps in every later recorded block, a heuristic; the paper's
        settings come from ablations, e.g. block 9 for Wan2.1-1.3B).
        """
        if not bool((self.rows > 0).any()):
            raise ValueError("no block output was captured: pass the stats as Guidance(capture=...) and sample")
        peaks, pos = self.mean_peak(), self._mean(self.pos)
        slots, ma_count, weak_count, strength = [], {}, {}, torch.zeros(self.dim, dtype=torch.float64)
        is_ma = torch.zeros(self.steps, len(self.blocks), self.dim, dtype=torch.bool)
        for s, k in torch.nonzero(self.rows > 0).tolist():
            p = peaks[s, k]  # (D,)
            slot = classify(p, ratio, sigmas, top)
            is_ma[s, k] = p > ratio * slot["mean_peak"]
            strength += p / max(slot["mean_peak"], 1e-300)
            for counts, found in ((ma_count, slot["ma"]), (weak_count, slot["weak_ma"])):
                for e in found:
                    counts[e["dim"]] = counts.get(e["dim"], 0) + 1
            slots.append({"step": s, "block": self.blocks[k], "rows": int(self.rows[s, k]), **slot,
                          "profile": {"dim": self.profile_dims[k],
                                      **self._frame_means(self.profile[s, k] / self.rows[s, k])}})
        most = max(ma_count.values(), default=0)
        ma_channels = sorted(d for d, n in ma_count.items() if 2 * n >= most)
        # the leading channel: the most frequent MA channel, else the strongest peak-to-mean channel
        lead = max(ma_channels, key=lambda d: (ma_count[d], strength[d].item())) if ma_channels \
            else int(strength.argmax())
        div = lambda x, y: [u / v if u is not None and v else None for u, v in zip(x, y)]
        positional = {}
        for k, b in enumerate(self.blocks):
            done = self.rows[:, k] > 0
            f, bd, it = (pos[done, k, j, lead].tolist() if len(self.sets[j]) else [None] * int(done.sum())
                         for j in range(3))  # None: an empty set (e.g. p too small for any boundary token)
            positional[str(b)] = {
                "dim": lead, "steps": torch.nonzero(done).flatten().tolist(), "first": f, "boundary": bd,
                "interior": it, "boundary_to_interior": div(bd, it), "first_to_interior": div(f, it),
                "decay_last_over_first": {n: div(x[-1:], x[:1])[0] if x else None
                                          for n, x in (("first", f), ("boundary", bd), ("interior", it))}}
        block = self._suggest_block(is_ma, lead) if ma_channels else None
        dims = ",".join(map(str, ma_channels))
        return {"protocol": {"ratio": ratio, "sigmas": sigmas, "p": self.p, "prompts": self.prompts,
                             "blocks": self.blocks, "steps": self.steps, "dim": self.dim,
                             "tokens": self.layout.num_tokens, "positional_sizes": [len(i) for i in self.sets]},
                "ma_channels": ma_channels, "ma_counts": {str(d): n for d, n in sorted(ma_count.items())},
                "weak_ma_counts": {str(d): n for d, n in sorted(weak_count.items())}, "lead_dim": lead,
                "lead_is_ma": bool(ma_channels), "stas": {"dims": ma_channels, "block": block},
                "stas_flags": f"--stas-dims {dims} --stas-block {block}" if ma_channels else "",
                "dg_flags": f"--dg-dims {dims} --dg-block {block}" if ma_channels else "",
                "positional": positional, "slots": slots,
                "a1": [{"step": s_, "block": b, "prompts": n, **classify((a / n).amax(dim=0), ratio, sigmas, top)}
                       for (s_, b), a in self.a1.items() if (n := self.a1_rows[s_, b])]}

    def _frame_means(self, profile: torch.Tensor) -> dict:
        """Per token frame: the mean of a token profile (L,) over its boundary B(p) and interior tokens."""
        lay, kw = self.layout, self.layout.boundary_width(self.p)
        x = profile[lay.text_len:].view(lay.token_frames, lay.n)  # (frames, n)
        edge = torch.zeros(lay.n, dtype=torch.bool)
        edge[:kw], edge[lay.n - kw:] = True, True
        mean = lambda m: x[:, m].mean(dim=1).tolist() if bool(m.any()) else None
        return {"frame_boundary": mean(edge), "frame_interior": mean(~edge)}

    def _suggest_block(self, is_ma: torch.Tensor, dim: int) -> int:
        done = self.rows > 0  # (steps, blocks)
        often = [2 * int(is_ma[done[:, k], k, dim].sum()) >= int(done[:, k].sum()) > 0
                 for k in range(len(self.blocks))]  # MA at >= half of the block's captured steps
        for k in range(len(self.blocks)):
            if all(often[k:]):
                return self.blocks[k]
        return self.blocks[often.index(True)] if any(often) else self.blocks[int(is_ma[..., dim].sum(0).argmax())]


# ----------------------------------------------------------------------------------------------------------
# plots (matplotlib, Agg)


def plot_token_profile(stats: MAStats, step: int, block: int, path) -> Path:
    """Fig. 1e: mean |h| of the profile channel at every token, latent-frame starts dashed, B(p) shaded."""
    y, lay = stats.token_profile(step, block).numpy(), stats.layout
    boundary = stats.layout.boundary(stats.p).numpy()

    def draw(fig):
        ax = fig.add_subplot()
        ax.plot(np.arange(len(y)), y, lw=0.6, color="tab:blue")
        ax.scatter(boundary, y[boundary], s=2, color="tab:red", label=f"boundary tokens B({stats.p:g}%)")
        for f in range(lay.token_frames + 1):
            ax.axvline(lay.text_len + f * lay.n, color="gray", ls="--", lw=0.5)
        ax.set(xlabel="token index (latent frames dashed)", ylabel="mean |h|",
               title=f"channel {stats.profile_dims[stats.slot[block]]}, block {block}, step {step}")
        ax.legend(loc="upper right", fontsize=8)

    return write_figure(path, draw)


def plot_channel_peaks(stats: MAStats, report: dict, step: int, block: int, path) -> Path:
    """Fig. 2a-style bars: the per-channel peak over tokens at one (step, block), MA / weak-MA channels labelled."""
    p = stats.mean_peak()[step, stats.slot[block]].numpy()
    slot = next(s for s in report["slots"] if s["step"] == step and s["block"] == block)

    def draw(fig):
        ax = fig.add_subplot()
        ax.bar(np.arange(len(p)), p, width=1.0, color="tab:gray")
        ax.axhline(report["protocol"]["ratio"] * slot["mean_peak"], color="tab:red", ls="--", lw=0.8,
                   label=f"{report['protocol']['ratio']:g} x mean peak (MA)")
        ax.axhline(slot["mu_plus_sigmas"], color="tab:orange", ls=":", lw=0.8, label="mu + 3 sigma (weak-MA)")
        for kind, color in (("ma", "tab:red"), ("weak_ma", "tab:orange")):
            for e in slot[kind]:
                ax.bar(e["dim"], e["peak"], width=max(1.0, len(p) / 300), color=color)
                ax.annotate(str(e["dim"]), (e["dim"], e["peak"]), ha="center", va="bottom", fontsize=8, color=color)
        ax.set(xlabel="channel", ylabel="peak |h| over tokens",
               title=f"block {block}, step {step}: {len(slot['ma'])} MA, {len(slot['weak_ma'])} weak-MA")
        ax.legend(loc="upper right", fontsize=8)

    return write_figure(path, draw)


def plot_positional(report: dict, block: int, path) -> Path:
    """Fig. 2a-b: first / boundary / interior mean |h| of the lead channel over steps, and boundary / interior."""
    r = report["positional"][str(block)]
    nan = lambda xs: [np.nan if v is None else v for v in xs]  # an empty token set plots as a gap

    def draw(fig):
        ax, bx = fig.subplots(1, 2)
        for name, color in (("first", "tab:red"), ("boundary", "tab:orange"), ("interior", "tab:blue")):
            ax.plot(r["steps"], nan(r[name]), marker="o", ms=3, color=color, label=name)
        ax.set(xlabel="sampling step", ylabel="mean |h|", title=f"channel {r['dim']}, block {block}")
        ax.legend(fontsize=8)
        bx.plot(r["steps"], nan(r["boundary_to_interior"]), marker="o", ms=3, color="tab:purple")
        bx.axhline(1.0, color="gray", ls="--", lw=0.5)
        bx.set(xlabel="sampling step", ylabel="boundary / interior", title=f"B({report['protocol']['p']:g}%) ratio")

    return write_figure(path, draw)


def write_plots(stats: MAStats, report: dict, out: str | Path, step: int | None = None,
                block: int | None = None) -> list[Path]:
    """The three figures as PNGs in `out` at one (step, block) (default: the captured step nearest to
    min(5, steps - 1), as in STAS B.2 -- an A14B expert captures only its own steps -- and the middle recorded
    block)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if step is None:
        done = torch.nonzero((stats.rows > 0).any(dim=1)).flatten().tolist()
        step = min(done, key=lambda s: abs(s - min(5, stats.steps - 1)))
    block = stats.blocks[len(stats.blocks) // 2] if block is None else block
    return [plot_token_profile(stats, step, block, out / f"token_profile_b{block}_s{step}.png"),
            plot_channel_peaks(stats, report, step, block, out / f"channel_peaks_b{block}_s{step}.png"),
            plot_positional(report, block, out / f"positional_b{block}.png")]
