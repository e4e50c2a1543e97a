"""The critic-divergence instruments and fixes (v2a_utils/stability.py, the IQL flags --critic-layernorm, --td-target-clip,
--critic-grad-clip)."""
import glob
import os

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_v2a import SCRIPTS, TINY_BUDGETS, run

from v2a_utils import stability


def test_clip_grads_is_clip_grad_norm():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    net(torch.randn(5, 3)).pow(2).sum().backward()
    grads = {k: p.grad.clone() for k, p in net.named_parameters()}
    norm = stability.clip_grads_(grads, 0.1)
    assert norm == pytest.approx(float(torch.nn.utils.clip_grad_norm_(net.parameters(), 0.1)), rel=1e-5)
    for k, p in net.named_parameters():
        assert torch.allclose(grads[k], p.grad, atol=1e-7)
    same = {k: g.clone() for k, g in grads.items()}
    stability.clip_grads_(same, 0.0)  # 0: off
    assert all(torch.equal(same[k], grads[k]) for k in grads)


def test_return_bounds_by_hand():
    assert stability.return_bounds(torch.tensor([-1.0, 3.0]), 0.99) == pytest.approx((-100.0, 300.0))
    assert stability.return_bounds(torch.tensor([0.5, 3.0]), 0.9) == pytest.approx((0.0, 30.0))  # r > 0: lo 0


def scalars(run_dir: str) -> set:
    acc = EventAccumulator(glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))[0]).Reload()
    return set(acc.Tags()["scalars"])


def test_fix_flags_train_and_the_instruments_are_logged(tiny_data, tmp_path):
    """One dvdf run with every fix on: it trains, and logs the gradient norms, w's range and Q per domain against the
    return bound."""
    run("v2a_iql", tmp_path, *tiny_data["base_args"], *TINY_BUDGETS, "--variant", "dvdf", "--critic-layernorm",
        "--td-target-clip", "--critic-grad-clip", "1.0")
    (run_dir,) = glob.glob(os.path.join(tmp_path, "runs", "*"))
    tags = scalars(run_dir)
    for tag in ("charts/grad_norm_qf", "charts/grad_norm_vf", "charts/td_weight_max", "charts/td_weight_min",
                "charts/q_domain/gravity-0.5", "charts/q_domain/target", "charts/q_max_source", "charts/return_bound_hi"):
        assert tag in tags, tag
    sd = torch.load(os.path.join(run_dir, "stage5.pt"), weights_only=False)["vf"]
    assert sorted(k for k in sd if k.endswith("weight")) == ["0.weight", "3.weight", "6.weight"]  # a norm before each ReLU


def test_layernorm_critic_is_normalised():
    m = SCRIPTS["v2a_iql"]
    ens = m.EnsembleMLP(2, 3, 1, layernorm=True)
    x = torch.randn(7, 3) * 100
    h = torch.baddbmm(ens.b[0], x.expand(2, 7, 3), ens.w[0])
    h = torch.nn.functional.relu(torch.nn.functional.layer_norm(h, h.shape[-1:]))
    h = torch.nn.functional.relu(torch.nn.functional.layer_norm(torch.baddbmm(ens.b[1], h, ens.w[1]), (256,)))
    assert torch.allclose(ens(x), torch.baddbmm(ens.b[2], h, ens.w[2]), atol=1e-5)
