"""The non-finite step guard every training loop shares (ssamba.train.guard): skip, count, reset, stop; and the
check that nothing non-finite is ever saved. The loops' own divergence runs are in test_pretrain, test_finetune
and test_hubert_train."""

import math

import pytest
import torch

from ssamba.train.checkpoint import save_checkpoint
from ssamba.train.guard import NonFiniteGuard, NonFiniteLossError


def _model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _backward(model, scale: float) -> float:
    loss = model(torch.ones(1, 3)).sum() * scale
    loss.backward()
    return float(loss.detach())


def test_a_skipped_step_never_reaches_the_weights_and_is_counted():
    model, optimizer = _model_and_optimizer()
    entries = []
    guard = NonFiniteGuard(3, entries.append)
    assert guard.check(_backward(model, 1.0), 1, optimizer)
    optimizer.step()
    optimizer.zero_grad()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adam_steps = [float(s["step"]) for s in optimizer.state.values()]
    assert not guard.check(_backward(model, math.nan), 2, optimizer)
    assert all(p.grad is None for p in model.parameters())  # the NaN gradients are dropped, nothing to step
    optimizer.step()  # a loop that stepped anyway would change nothing
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert [float(s["step"]) for s in optimizer.state.values()] == adam_steps
    assert entries == [{"step": 2, "skipped": True, "reason": "non-finite loss nan", "skipped_steps": 1}]
    assert guard.state_dict() == {"bad_in_row": 1, "skipped_steps": 1}


def test_a_good_step_resets_the_run_and_the_limit_raises_one_line(tmp_path):
    model, optimizer = _model_and_optimizer()
    guard = NonFiniteGuard(2, None, tmp_path / "checkpoints")
    assert not guard.check(math.inf, 1, optimizer)
    assert guard.check(0.5, 2, optimizer) and guard.bad_in_row == 0  # a good step resets the count in a row
    guard.skip(3, optimizer, "no usable items in the batch")
    with pytest.raises(NonFiniteLossError, match=r"2 skipped steps in a row \(step 4, last: non-finite loss -inf; "
                                                 r"3 skipped in all\).*no checkpoint was written") as info:
        guard.check(-math.inf, 4, optimizer)
    assert "\n" not in str(info.value) and isinstance(info.value, RuntimeError)
    # resumed from a checkpoint's state: the run in a row and the total carry over (older checkpoints: zeros)
    resumed = NonFiniteGuard(5)
    resumed.load_state_dict({"bad_in_row": 1, "skipped_steps": 4, "step": 9})
    assert resumed.state_dict() == {"bad_in_row": 1, "skipped_steps": 4}
    resumed.load_state_dict({"step": 9})
    assert resumed.state_dict() == {"bad_in_row": 0, "skipped_steps": 0}
    with pytest.raises(NonFiniteLossError, match="1 skipped steps in a row"):
        NonFiniteGuard(0).skip(1, optimizer, "no usable items in the batch")  # 0: stop at the first, as 1


def test_non_finite_weights_are_never_saved(tmp_path):
    model, _ = _model_and_optimizer()
    folder = tmp_path / "checkpoints"
    kept = save_checkpoint(folder, 3, dict(model.state_dict()), {"step": 3}, keep_last=2)
    guard = NonFiniteGuard(5, None, folder)
    guard.check_weights(model, 4)  # finite: nothing to say
    with torch.no_grad():
        model.bias[1] = math.inf
    with pytest.raises(NonFiniteLossError, match="weight bias is NaN or infinite after step 4; nothing saved") as info:
        guard.check_weights(model, 4)
    assert str(info.value).endswith(f"last good checkpoint: {kept}")
