"""A ScoreLedger that records each target's score, for tests that compare scores target by target."""

import numpy as np

import train_gpt as tg


class RecordingLedger(tg.ScoreLedger):
    """The real ledger, plus each target's NLL (`per_target`, NaN until scored) and the commit that
    scored it (`commit_order`, counted from 1), read off what `commit` returns."""

    def __init__(self, tokens, luts, device, **kwargs):
        super().__init__(tokens, luts, device, **kwargs)
        self.per_target = np.full(self.num_targets + 1, np.nan)
        self.commit_order = np.zeros(self.num_targets + 1, dtype=np.int64)
        self.commits = 0

    def commit(self, spans, logits, x, y, mask):
        nll = super().commit(spans, logits, x, y, mask)
        self.commits += 1
        targets = np.concatenate([np.arange(a + 1, b + 1) for a, b in spans])  # nll[mask]'s order: row after row
        self.per_target[targets] = nll[mask].double().cpu().numpy()
        self.commit_order[targets] = self.commits
        return nll
