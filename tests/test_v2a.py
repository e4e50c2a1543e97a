"""v2a_iql.py and v2a_td3bc.py: the losses and the filter on hand-checkable inputs, the relabelling, input errors, tiny
end-to-end runs of every variant of both files (plus --resume and --reuse-stages) on the `tiny_data` datasets, and the
two files being identical outside their backbone sections."""
import glob
import json
import math
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F
import tyro
from conftest import ROOT, run_script, validate_args

import data_gen
import v2a_iql as v
import v2a_td3bc
import v2a_utils
from v2a_utils import flags, mixtures, timing, training

SCRIPTS = {"v2a_iql": v, "v2a_td3bc": v2a_td3bc}

STAGE_BUDGETS = ["--repr-steps", "20", "--sql-steps", "20", "--info-steps", "20"]
TINY_BUDGETS = STAGE_BUDGETS + ["--total-steps", "100", "--eval-freq", "50", "--eval-episodes", "1", "--log-freq", "50",
                                "--final-eval-episodes", "3", "--no-compile"]
STAGE_FILES = {"v2a": [1, 2, 3, 4, 5], "dvdf": [3, 4, 5], "igdf": [4, 5], "merged": [5], "target": [5], "bc": [5]}


# ---- losses --------------------------------------------------------------------------------------------------------
def test_expectile_loss():
    u = torch.tensor([1.0, -1.0, 2.0])
    assert v.expectile_loss(u, 0.7).item() == pytest.approx((0.7 * 1 + 0.3 * 1 + 0.7 * 4) / 3)


def test_sql_v_loss():
    # A = q - v = 0: sp = 1 -> 1 + v/alpha
    assert v.sql_v_loss(torch.tensor([2.0]), torch.tensor([2.0]), 0.5).item() == pytest.approx(1 + 2 / 0.5)
    # A = -4 alpha: sp = -1 < 0 -> only v/alpha
    assert v.sql_v_loss(torch.tensor([-0.8]), torch.tensor([0.0]), 0.2).item() == pytest.approx(0.0)
    # A = 2 alpha: sp = 2 -> 4 + v/alpha
    assert v.sql_v_loss(torch.tensor([1.4]), torch.tensor([1.0]), 0.2).item() == pytest.approx(4 + 5)


def test_td_loss_weighted_sum_over_critics():
    q, y, w = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([0.0, 0.0]), torch.tensor([2.0, 1.0])
    assert v.td_loss(q, y).item() == pytest.approx((1 + 4) / 2 + 0)
    assert v.td_loss(q, y, w).item() == pytest.approx((2 * 1 + 1 * 4) / 2)


def test_awr_actor_loss_uses_tanh_mean_and_clamps():
    mean, a = torch.zeros(2, 3), torch.full((2, 3), 0.5)
    assert v.awr_actor_loss(mean, a, torch.zeros(2), 3.0).item() == pytest.approx(0.25)
    assert v.awr_actor_loss(mean, a, torch.full((2,), 10.0), 3.0).item() == pytest.approx(25.0)  # exp(30) -> 100


def test_td3bc_actor_loss_and_smoothing():
    q1, pi, a = torch.tensor([2.0, -4.0]), torch.tensor([[0.5], [0.0]]), torch.tensor([[0.0], [0.0]])
    # lambda = 2.5 / mean|Q1| = 2.5 / 3; -lambda mean Q1 = -(2.5 / 3) * (-1); BC = (0.25 + 0) / 2
    assert v2a_td3bc.td3bc_actor_loss(q1, pi, a, 2.5).item() == pytest.approx(2.5 / 3 + 0.125)
    torch.manual_seed(0)
    pi_next = torch.tensor([[0.9] * 1000, [0.0] * 1000])
    a2 = v2a_td3bc.smoothed_target_action(pi_next, 0.2, 0.5)
    assert a2.max() <= 1.0 and (a2 - pi_next).abs().max() <= 0.5 + 1e-6 and (a2[1].std() - 0.2).abs() < 0.03


def test_files_identical_outside_backbone():
    """A fix to a shared stage must land in both files: outside the `# >>> backbone` ... `# <<< backbone` sections
    and the header comment, v2a_td3bc.py is v2a_iql.py with the backbone's name replaced."""
    def shared(name, rename=lambda t: t):
        text = rename(open(os.path.join(ROOT, f"{name}.py")).read())
        text = text[text.index("import "):]
        out, inside = [], False
        for line in text.splitlines():
            if line.strip().startswith("# >>> backbone"):
                inside = True
                out.append("<backbone>")
            elif line.strip() == "# <<< backbone":
                inside = False
            elif not inside:
                out.append(line)
        return out
    iql = shared("v2a_iql")
    td3bc = shared("v2a_td3bc", lambda t: t.replace("v2a_td3bc", "v2a_iql").replace("TD3+BC", "IQL"))
    assert iql.count("<backbone>") == 3 and iql == td3bc


def test_info_nce_loss():
    B, k = 4, 3
    assert v.info_nce_loss(torch.zeros(B, k), torch.ones(B, k), torch.ones(B - 1, k)).item() == pytest.approx(math.log(2))
    phi, pos, neg = torch.randn(B, k), torch.randn(B, k), torch.randn(B - 1, k)
    ref = sum(F.binary_cross_entropy_with_logits(phi[i] @ torch.cat([pos[i : i + 1], neg]).T,
                                                 torch.tensor([1.0] + [0.0] * (B - 1)), reduction="sum") for i in range(B))
    assert v.info_nce_loss(phi, pos, neg).item() == pytest.approx(ref.item() / (B * B), rel=1e-5)  # per-row layout


def test_cosine_score():
    x = torch.tensor([[1.0, 2.0], [1.0, 0.0]])
    assert v.cosine_score(x, 3 * x).tolist() == pytest.approx([1.0, 1.0])
    assert v.cosine_score(x, -x).tolist() == pytest.approx([-1.0, -1.0])
    assert v.cosine_score(x, torch.tensor([[-2.0, 1.0], [0.0, 5.0]])).tolist() == pytest.approx([0.0, 0.0])


def test_tc_elbo_losses():
    B, T, ds, da, zd, K = 2, 4, 3, 2, 5, 3
    dec = v.EnsembleMLP(K, ds + da + zd, ds, decoder_init=True)
    for p in dec.parameters():
        p.data.zero_()  # predicts 0 everywhere
    delta = torch.arange(B * T * ds, dtype=torch.float32).view(B, T, ds)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    z, zeros = torch.randn(B, zd), torch.zeros(B, zd)
    rec, kl = v.tc_elbo_losses(dec, torch.randn(B, T, ds), torch.randn(B, T, da), delta, mask, z, zeros, zeros)
    expected = (delta**2).sum(-1)[mask.bool()].sum() / (mask.sum() * ds)  # padded steps do not count
    assert rec.item() == pytest.approx(expected.item())
    assert kl.item() == pytest.approx(0.0)
    _, kl = v.tc_elbo_losses(dec, torch.randn(B, T, ds), torch.randn(B, T, da), delta, mask, z, torch.ones(B, zd), zeros)
    assert kl.item() == pytest.approx(0.5 * zd)


def test_ensemble_mlp_is_independent_members():
    torch.manual_seed(0)
    net, x = v.EnsembleMLP(3, 4, 2), torch.randn(5, 4)
    out = net(x)
    for k in range(3):
        h = x
        for i, (w, b) in enumerate(zip(net.w, net.b)):
            h = h @ w[k] + b[k]
            h = torch.relu(h) if i < 2 else h
        assert torch.allclose(out[k], h, atol=1e-6)
    dec = v.EnsembleMLP(3, 4, 2, decoder_init=True)
    assert (dec.b[0] == 0.1).all() and dec.w[-1].abs().max() <= 3e-3


def test_adam_step_matches_torch_adam():
    """The stage-5 update steps Adam with adam_step_ (foreach ops, so that it compiles into the update). From the same
    gradients it makes the same parameters as torch.optim.Adam (fused) to float rounding, through the first steps where
    the bias corrections dominate and for gradients down to Adam's eps; its state_dict is Adam's own."""
    torch.manual_seed(0)
    ref_net = v.mlp(5, 2, hidden=16)
    net = v.mlp(5, 2, hidden=16)
    net.load_state_dict(ref_net.state_dict())
    ref = torch.optim.Adam(ref_net.parameters(), lr=torch.tensor(3e-4), fused=True)
    opt = v2a_utils.init_adam_state(torch.optim.Adam(net.parameters(), lr=torch.tensor(3e-4), fused=True))
    for step in range(40):
        grads = {k: torch.randn_like(p) * 10.0 ** -(step % 9) for k, p in net.named_parameters()}
        for (k, p) in ref_net.named_parameters():
            p.grad = grads[k].clone()
        ref.step()
        v2a_utils.adam_step_(opt, grads)
        for a, b in zip(ref_net.parameters(), net.parameters()):
            assert torch.allclose(a, b, rtol=0, atol=2e-7), step
    for a, b in zip(ref.state_dict()["state"].values(), opt.state_dict()["state"].values()):
        assert a.keys() == b.keys() and a["step"] == b["step"] == 40
        assert torch.allclose(a["exp_avg_sq"], b["exp_avg_sq"], rtol=1e-5, atol=0)


def test_grad_and_value_compiled_and_eager_forms_agree():
    """Stage 5 takes its gradients with utils.grad_and_value: torch.func's transform inside torch.compile, autograd in
    eager mode. On a tuple of parameter dicts (IQL's Q-and-actor loss) the two give the same gradients, bit for bit."""
    torch.manual_seed(0)
    qf, actor, x, y = v.EnsembleMLP(2, 14, 1), v.mlp(11, 6), torch.randn(192, 14), torch.randn(192)

    def loss_fn(params, x, y):
        q_loss = v.td_loss(torch.func.functional_call(qf, params[0], x).squeeze(-1), y)
        actor_loss = (torch.func.functional_call(actor, params[1], x[:, :11]) ** 2).mean()
        return q_loss + actor_loss, q_loss.detach()

    params = (v2a_utils.params(qf), v2a_utils.params(actor))
    with torch.no_grad():  # as in the update: the gradients come from the helper alone
        eager, (loss, aux) = v2a_utils.grad_and_value(loss_fn, params, x, y)
        func, (loss_f, aux_f) = torch.func.grad_and_value(loss_fn, has_aux=True)(params, x, y)
    assert torch.equal(loss, loss_f) and torch.equal(aux, aux_f)
    for g_eager, g_func in zip(eager, func):
        assert g_eager.keys() == g_func.keys()
        for k in g_eager:
            assert torch.equal(g_eager[k], g_func[k]), k


def test_a_graph_break_in_the_compiled_update_is_an_error():
    """--compile compiles the stage-5 update as one graph (fullgraph=True): an update that dynamo cannot trace whole
    stops with a message that names the way out, instead of running part of the update eagerly without a word."""
    flags = types.SimpleNamespace(compile=True)
    whole = v2a_utils.compiled(lambda x: (x * 2).sum(), flags, torch.device("cpu"))
    assert whole(torch.ones(3)).item() == 6.0

    def broken(x):
        torch._dynamo.graph_break()
        return x * 2

    with pytest.raises(RuntimeError, match="no longer compiles as one graph.*--no-compile.*TORCH_LOGS=graph_breaks"):
        v2a_utils.compiled(broken, flags, torch.device("cpu"))(torch.ones(3))
    assert v2a_utils.compiled(broken, types.SimpleNamespace(compile=False), torch.device("cpu"))(torch.ones(3)).sum() == 6


def test_a_compiler_failure_names_the_way_out(monkeypatch):
    """A compiler that fails on the update (torch 2.11's inductor did on CUDA) stops the run with a message that
    says how to continue it, eagerly, from its saved stages."""
    import torch._inductor.exc

    def failing_compiler(fn, **kw):
        def call(*a):
            raise torch._inductor.exc.InductorError(AssertionError("reorder_loops_by_dep_pair"), None)
        return call

    monkeypatch.setattr(torch, "compile", failing_compiler)
    update = v2a_utils.compiled(lambda x: x * 2, types.SimpleNamespace(compile=True), torch.device("cpu"))
    way_on = r"failed to compile the stage-5 update.*same command again with --resume runs/<this run> --no-compile"
    with pytest.raises(RuntimeError, match=way_on):
        update(torch.ones(3))


def test_awr_source_share_by_hand():
    """The source rows' share of the batch's advantage weight min(exp(beta u), 100): rows before the last n_target."""
    u = torch.tensor([0.0, 0.0, math.log(3.0), 10.0])  # weights 1, 1, 3 and exp(10) clamped to 100
    assert v.awr_source_share(u, 1.0, n_target=2).item() == pytest.approx(2 / 105)
    assert v.awr_source_share(u, 1.0, n_target=1).item() == pytest.approx(5 / 105)


def test_batch_value_means_split_target_and_source_rows():
    """Stage 5 logs the critics' mean on the batch's target rows (its last batch_size rows) and source rows, in the
    order of value_tags; a target-only run has no source rows and logs none."""
    q, v = torch.arange(6.0), torch.arange(6.0) * 10  # rows 0-3: source, rows 4-5: target
    mixed, target_only = (types.SimpleNamespace(batch_size=2, variant=var) for var in ("v2a", "target"))
    assert [m.item() for m in v2a_utils.batch_value_means((q, v), mixed)] == [4.5, 45.0, 1.5, 15.0]
    assert [m.item() for m in v2a_utils.batch_value_means((q,), target_only)] == [4.5]
    tags = v2a_utils.value_tags(types.SimpleNamespace(variant="v2a"), ("q", "v"))
    assert tags == ["charts/q_target_rows", "charts/v_target_rows", "charts/q_source_rows", "charts/v_source_rows"]
    assert v2a_utils.value_tags(types.SimpleNamespace(variant="target"), ("q",)) == ["charts/q_target_rows"]


def test_gru_last_state_equals_the_packed_nn_gru():
    """v2a_utils.gru_last_state (the CPU recurrence stage 1 runs) gives the packed nn.GRU's final states and the same
    gradients, to float rounding (its rows at a step may be in another order), for sequences of mixed lengths."""
    torch.manual_seed(0)
    gru, x, lengths = torch.nn.GRU(7, 16, batch_first=True), torch.randn(6, 9, 7), torch.tensor([3, 9, 1, 9, 5, 2])
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    grads = []
    for last in (gru(packed)[1][0], v2a_utils.gru_last_state(gru, x, lengths)):
        grads.append(torch.autograd.grad(last.square().sum(), list(gru.parameters())))
        grads[-1] += (last.detach(),)
    for ref, ours in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_encoder_reads_the_last_valid_step():
    """The packed GRU gives, for each padded sequence, the state after its own last valid step: the same as running
    the sequence alone without padding."""
    torch.manual_seed(0)
    enc, lengths = v.TrajectoryEncoder(4, 3, hidden=8), torch.tensor([5, 2, 7])
    x = torch.randn(3, 7, 4)
    mu, log_std = enc(x, lengths)
    for i, n in enumerate(lengths.tolist()):
        mu_i, log_std_i = enc(x[i : i + 1, :n], lengths[i : i + 1])
        assert torch.allclose(mu[i], mu_i[0], atol=1e-6) and torch.allclose(log_std[i], log_std_i[0], atol=1e-6)
        out, _ = enc.gru(x[i : i + 1, :n])  # the unpacked GRU's output at the last step
        assert torch.allclose(mu[i], enc.mu(out[0, -1]), atol=1e-6)


def test_ensemble_mlp_group_input_equals_concatenation():
    """forward(x, z) computes z's share of the first layer once per group of T rows: the same function as feeding
    [x, z] row by row, values and gradients."""
    torch.manual_seed(0)
    net, G, T = v.EnsembleMLP(3, 5 + 7, 4, decoder_init=True), 3, 6
    x, z = torch.randn(G * T, 5), torch.randn(G, 7, requires_grad=True)
    full = net(torch.cat([x, z.repeat_interleave(T, 0)], -1))
    grouped = net(x, z, torch.arange(G).repeat_interleave(T))
    assert torch.allclose(full, grouped, atol=1e-6)
    g_full = torch.autograd.grad(full.square().sum(), [z, *net.parameters()])
    g_grouped = torch.autograd.grad(grouped.square().sum(), [z, *net.parameters()])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_full, g_grouped))


# ---- filter --------------------------------------------------------------------------------------------------------
def test_filter_scores_minmax_and_tradeoff():
    h, adv = torch.tensor([0.5, -0.5, 0.0, 1.0]), torch.tensor([3.0, -1.0, 1.0, 7.0])
    f, adv_norm = v.filter_scores(h, adv, 0.6)
    assert adv_norm.min().item() == pytest.approx(0.0) and adv_norm.max().item() == pytest.approx(1.0, abs=1e-6)
    assert adv_norm.tolist() == pytest.approx([0.5, 0.0, 0.25, 1.0], abs=1e-6)
    assert f.tolist() == pytest.approx((0.6 * h + 0.4 * adv_norm).tolist())
    assert v.filter_scores(h, adv, 1.0)[0].tolist() == pytest.approx(h.tolist())  # lambda = 1: IGDF's ranking
    batched = v.filter_scores(torch.zeros(3, 8), torch.randn(3, 8) * 100, 0.0)[1]  # per-row min-max
    assert (batched >= 0).all() and (batched <= 1).all() and torch.allclose(batched.amax(1), torch.ones(3), atol=1e-6)


def test_kept_count_and_select_kept():
    assert [v.kept_count(128, xi) for xi in (0.5, 0.75, 1.0, 0.001, 0.3)] == [64, 96, 128, 1, 38]
    f = torch.tensor([0.1, 0.9, 0.3, 0.7, 0.5])
    assert sorted(v.select_kept(f, 2).tolist()) == [1, 3]
    assert v.select_kept(torch.randn(4, 128), v.kept_count(128, 0.5)).shape == (4, 64)


def test_source_weight_clamp_and_range():
    assert v.source_weight(torch.tensor([10.0])).item() == 100.0
    w = v.source_weight(torch.linspace(-1, 1, 11))
    assert w.min().item() == pytest.approx(math.exp(-1)) and w.max().item() == pytest.approx(math.e)


# ---- relabelling ---------------------------------------------------------------------------------------------------
def test_relabel_full_trajectory_z_constant_within_trajectory():
    torch.manual_seed(0)
    ds, da, lens = 3, 2, torch.tensor([5, 1, 12, 3, 7])
    data = torch.randn(int(lens.sum()), 2 * ds + da + 2)
    d = dict(data=data, ds=ds, da=da, traj_len=lens, traj_start=torch.cumsum(lens, 0) - lens,
             traj_id=torch.repeat_interleave(torch.arange(len(lens)), lens))
    enc = v.TrajectoryEncoder(2 * ds + da, 4)
    z = v.relabel(enc, d, chunk=2)  # chunks pad shorter trajectories: padding must not change z
    for i, (s0, n) in enumerate(zip(d["traj_start"].tolist(), lens.tolist())):
        s, a, _, s2, _ = v.split(data[s0 : s0 + n][None], ds, da)
        alone = enc(torch.cat([s, a, s2 - s], -1), torch.tensor([n]))[0][0]
        assert torch.allclose(z[i], alone.detach(), atol=1e-5)
    z_rows = z[d["traj_id"]]  # per-transition z, as stage 3 and the filter read it
    for i, (s0, n) in enumerate(zip(d["traj_start"].tolist(), lens.tolist())):
        assert (z_rows[s0 : s0 + n] == z[i]).all()


SOURCE_SPECS = ["a-1:expert:2,b:random", "gravity-0.5:random:1.5,torso-hard:medium:0.5", " x:random , y:expert:.5 ",
                "x:random:1e3", "x:medium:1E-2", "gravity-0.5", "x:good", "x:random:-1", "x:random:0", "x:random:inf",
                "x:random:nan", "x:random:-inf", "x:random:1e400", "x:random:abc", "x:random:1:2", "", " , ",
                "x:expert@nominal:2", "x:random@nominal", "x:medium@", "x:good@nominal"]


@pytest.mark.parametrize("spec", SOURCE_SPECS)
def test_mixture_grammar_errors_are_one_line(spec, monkeypatch):
    """The training scripts read --source with data_gen.py's grammar: the same entries, or its message as one line
    prefixed with the program's name."""
    monkeypatch.setattr(sys, "argv", ["v2a_td3bc.py"])
    try:
        expected = data_gen.parse_source(spec)
    except data_gen.DataGenError as e:
        with pytest.raises(SystemExit) as err:
            flags.parse_source(spec)
        assert str(err.value) == f"v2a_td3bc.py: error: {e}"
        return
    assert flags.parse_source(spec) == expected


@pytest.mark.parametrize("script", SCRIPTS)
def test_default_ids_and_sources(script, capsys):
    m = SCRIPTS[script]
    assert mixtures.size_tag(30_000) == "30k" and mixtures.size_tag(30_500) == "30500"  # exact: no two sizes share an id
    src, tgt = data_gen.dataset_ids("Hopper-v4", mixtures.DEFAULT_SOURCES["Hopper"], 1_000_000, 100_000)
    assert src == ["v2a/hopper-v4/source/torsohard-random-333333-v0", "v2a/hopper-v4/source/gravity0p5-expert-333333-v0",
                   "v2a/hopper-v4/source/legjnthard-medium-333333-v0"]
    assert tgt == "v2a/hopper-v4/target/medium-100k-v0"
    args = m.Args(env_id="Ant-v5")
    validate_args(m, args)  # --source None: the robot's default
    assert args.source == mixtures.DEFAULT_SOURCES["Ant"]
    with pytest.raises(SystemExit):
        tyro.cli(m.Args, args=["--help"])
    help_text = capsys.readouterr().out
    for name in (n for names in mixtures.NAMED_SOURCES.values() for n in names):
        assert f"`{name}`" in help_text  # --help names every named mixture


@pytest.mark.parametrize("script", SCRIPTS)
def test_space_mismatch_is_one_line(script, tiny_data, tmp_path, monkeypatch):
    import shutil

    import gymnasium as gym
    import minari
    import numpy as np
    from minari.data_collector.episode_buffer import EpisodeBuffer
    shutil.copytree(tiny_data["minari_path"], tmp_path, dirs_exist_ok=True)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    monkeypatch.setattr(sys, "argv", [f"{script}.py"])  # the program name in error messages
    sizes = tiny_data["source_size"], tiny_data["target_size"]
    bad_id = data_gen.dataset_ids(tiny_data["env_id"], tiny_data["source"], *sizes)[0][0]
    minari.delete_dataset(bad_id)
    buf = EpisodeBuffer(observations=np.zeros((11, 5)), actions=np.zeros((10, 3)), rewards=np.zeros(10),
                        terminations=np.zeros(10, bool), truncations=np.ones(10, bool))
    bad = minari.create_dataset_from_buffers(bad_id, [buf], observation_space=gym.spaces.Box(-np.inf, np.inf, (5,)),
                                             action_space=gym.spaces.Box(-1, 1, (3,)))
    args = SCRIPTS[script].Args(env_id=tiny_data["env_id"], source=tiny_data["source"],
                                source_size=tiny_data["source_size"], target_size=tiny_data["target_size"], generate=False)
    record = dict(flags.expected_generation(args)[bad_id], seed=0)  # passes the generation check
    bad.storage.update_metadata({"v2a_generation": json.dumps(record)})
    with pytest.raises(SystemExit, match=rf"{script}.py: error: the spaces of .* differ from the target's"):
        SCRIPTS[script].main(args)


# ---- bad input: one clear line, no traceback, before anything runs ------------------------------------------------
BAD_INPUT = [
    (dict(xi=0.0), "--xi must lie in"), (dict(xi=1.5), "--xi must lie in"), (dict(tradeoff=-0.1), "--tradeoff in"),
    (dict(xi=math.nan), "--xi must lie in"), (dict(repr_steps=0), "--repr-steps must be > 0"),
    (dict(variant="dvdf", sql_steps=0), "--sql-steps must be > 0"), (dict(variant="target", info_steps=-1), ">= 0"),
    (dict(variant="igdf", info_steps=0), "--info-steps must be > 0"), (dict(total_steps=0), "--total-steps must be > 0"),
    (dict(variant="merged", tradeoff=0.5), "--tradeoff applies to"), (dict(seed=-1), "--seed must lie in"),
    (dict(env_id="Hopper-v3"), "unknown --env-id 'Hopper-v3'; supported: Hopper-v4"),
    (dict(env_id="Humanoid-v4"), "unknown --env-id"), (dict(source="gravity-0.5:expert:inf"), "malformed source entry"),
    (dict(source="gravity-0.5:expert:nan"), "malformed source entry"), (dict(source="a:random:-1"), "malformed source"),
    (dict(source="a:random:0"), "malformed source entry"), (dict(source=" , "), "empty source spec"),
    (dict(source_size=2), "(torso-hard:random) would get 0 transitions; a dataset holds 1 to 10,000,000"),
    (dict(source="a:random:1,b:expert:1e6"), "(a:random) would get 0 transitions"),
    (dict(target_size=0), "--target-size 0: the target dataset would get no transition; the minimum is 1"),
    (dict(target_size=-1), "--target-size -1: the target dataset would get no transition"),
    (dict(source_size=-5), "--source-size -5: must be a positive number of transitions; the minimum --source-size for "
                           "this mixture is 3"), (dict(source_size=0), "--source-size 0: must be a positive number"),
    (dict(source="crossed", source_size=-1), "--source-size -1: must be a positive number of transitions; the minimum "
                                             "--source-size for this mixture is 4"),
    (dict(source="a:random:1e308,b:expert:1e308", source_size=0), "--source-size 0: must be a positive number"),
    (dict(target_size=10**9), "would get 1,000,000,000 transitions"),
    (dict(z_dim=0), "--z-dim must be > 0"), (dict(batch_size=0), "--batch-size must be > 0, got 0"),
    (dict(eval_episodes=-1), "must be > 0"), (dict(learning_rate=0.0), "--learning-rate must be finite and > 0"),
    (dict(learning_rate=math.inf), "--learning-rate"), (dict(sql_alpha=-0.2), "--sql-alpha"),
    (dict(threads=0), "--threads 0: must be at least 1"),
    (dict(gamma=1.5), "--gamma must lie in [0, 1]"), (dict(tau=0.0), "--tau in (0, 1]"), (dict(tau=2.0), "--tau"),
    (dict(sql_gamma=-0.1), "--sql-gamma must lie in [0, 1]"), (dict(sql_tau=0.0), "--sql-tau in (0, 1]"),
    (dict(bench=-1), "--bench takes a number >= 0"), (dict(bench=5, reuse_stages="."), "excludes --resume"),
    (dict(resume=".", reuse_stages="."), "exclude each other"), (dict(resume="no/such/run"), "is not a run directory"),
    (dict(target_size=999, generate=False), "missing datasets"),
]
BACKBONE_BAD_INPUT = [
    ("v2a_iql", dict(expectile=1.0), "--expectile must lie in (0, 1)"), ("v2a_iql", dict(expectile=0.0), "--expectile"),
    ("v2a_iql", dict(temperature=-1.0), "--temperature must be finite"), ("v2a_iql", dict(temperature=math.inf), "--temp"),
    ("v2a_td3bc", dict(policy_freq=0), "--policy-freq must be >= 1, got 0"), ("v2a_td3bc", dict(alpha=-1.0), "--alpha"),
    ("v2a_td3bc", dict(alpha=math.nan), "--alpha"), ("v2a_td3bc", dict(policy_noise=-0.1), "--policy-noise and"),
    ("v2a_td3bc", dict(noise_clip=-1.0), "--noise-clip must be finite"),
]


@pytest.mark.parametrize("script,overrides,message", [(s, o, m) for s in SCRIPTS for o, m in BAD_INPUT] + BACKBONE_BAD_INPUT)
def test_bad_input_is_one_line(script, overrides, message, tiny_data, tmp_path, monkeypatch):
    """Checked before any stage trains: with the datasets present, a bad flag must stop the run before it starts."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [f"{script}.py"])  # the program name in error messages
    m = SCRIPTS[script]
    args = dict(env_id=tiny_data["env_id"], source=tiny_data["source"], source_size=tiny_data["source_size"],
                target_size=tiny_data["target_size"], repr_steps=1, sql_steps=1, info_steps=1, total_steps=1)
    with pytest.raises(SystemExit) as e:
        m.main(m.Args(**{**args, **overrides}))
    assert str(e.value).startswith(f"{script}.py: error:") and message in str(e.value) and "\n" not in str(e.value)
    assert os.listdir(tmp_path) == []  # no run directory


def test_non_finite_loss_stops_the_stage():
    class Writer:
        def add_scalar(self, *a):
            pass
    with pytest.raises(SystemExit, match="non-finite loss in stage X at step 2"):
        training.run_stage("stage X", 5, lambda i: torch.tensor([float("nan") if i == 2 else 1.0]), ["l"], Writer(), 1)


# ---- the time estimate printed when a run starts -------------------------------------------------------------------
def test_the_estimate_scales_stage_1_with_the_crop_steps():
    """Stage 1's time follows the trajectory steps of an iteration: Hopper's default mixture (many short random
    episodes, 56 crop steps on average) against the crossed one (199): 2.8 h against 59 min for their budgets."""
    def stage_1(crop_steps, repr_steps):
        args = types.SimpleNamespace(env_id="Hopper-v4", repr_steps=repr_steps, sql_steps=0, dynamics_score="contrastive",
                                     info_steps=0, total_steps=0, vae_steps=0)
        line = timing.estimate(args, "v2a_iql.py", (1,), {}, torch.device("cpu"), crop_steps)
        return line.split("stage 1 ")[1].split(")")[0]

    assert stage_1(16 * 56.4, 100_000) == "2.8 h"
    assert stage_1(16 * 199.8, 10_000) == "59 min"


# ---- end to end ----------------------------------------------------------------------------------------------------
def run(script, cwd, *args, check=True):
    return run_script(f"{script}.py", *args, check=check, cwd=str(cwd))


def run_variant(script, cwd, tiny_data, variant, *extra):
    proc = run(script, cwd, *tiny_data["base_args"], *TINY_BUDGETS, "--variant", variant, *extra)
    (run_dir,) = glob.glob(os.path.join(cwd, "runs", f"*__{script}__{variant}__*"))
    return proc, run_dir


@pytest.fixture(scope="module", params=list(SCRIPTS))
def v2a_run(request, tiny_data, tmp_path_factory):
    cwd = tmp_path_factory.mktemp(request.param)
    return request.param, cwd, *run_variant(request.param, cwd, tiny_data, "v2a")


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("variant", [k for k in STAGE_FILES if k != "v2a"])
def test_end_to_end(script, variant, tiny_data, tmp_path):
    check_run(variant, *run_variant(script, tmp_path, tiny_data, variant))


@pytest.mark.parametrize("script", SCRIPTS)
def test_compiled_update_matches_eager(script, tiny_data, tmp_path):
    """--compile (the default) and --no-compile train the same stage 5: after 40 filtered updates from one seed the
    weights agree to float rounding (inductor fuses and reorders elementwise work, nothing else)."""
    weights = {}
    for mode in ("--compile", "--no-compile"):  # the flags given last override those of TINY_BUDGETS
        (tmp_path / mode).mkdir()
        _, run_dir = run_variant(script, tmp_path / mode, tiny_data, "igdf", "--total-steps", "40", "--eval-freq", "40", mode)
        weights[mode] = torch.load(os.path.join(run_dir, "stage5.pt"), weights_only=False)["qf"]
    for key, w in weights["--compile"].items():
        assert torch.allclose(w, weights["--no-compile"][key], rtol=1e-3, atol=1e-5), key


@pytest.mark.skipif(os.cpu_count() < 2, reason="one core: torch's default is then one thread as well")
def test_one_cpu_thread_unless_told(tiny_data, tmp_path):
    """torch's default is a thread per core; with another run beside it every step then waits on a descheduled thread
    (5-6x slower measured, docs/speed.md). The scripts take --threads (1) instead, with no OMP_NUM_THREADS set."""
    for threads in ("1", "2"):
        proc = run_script("v2a_iql.py", *tiny_data["base_args"], "--variant", "target", "--bench", "2", "--no-compile",
                          *(["--threads", threads] if threads != "1" else []), cwd=str(tmp_path), omp_threads=None)
        assert f"device cpu, {threads} threads" in proc.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: the CUDA path is not exercised")
@pytest.mark.parametrize("script", SCRIPTS)
def test_cuda_path(script, tiny_data, tmp_path):
    """On a CUDA machine: all five stages on the GPU, stage 5 compiled with CUDA graphs (mode reduce-overhead)."""
    proc, run_dir = run_variant(script, tmp_path, tiny_data, "v2a", "--cuda", "--compile")
    assert "device cuda" in proc.stdout
    check_run("v2a", proc, run_dir)


def test_end_to_end_v2a(v2a_run):
    check_run("v2a", *v2a_run[2:])


def check_run(variant, proc, run_dir):
    assert glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
    assert sorted(glob.glob(os.path.join(run_dir, "stage*.pt"))) == [os.path.join(run_dir, f"stage{k}.pt")
                                                                      for k in STAGE_FILES[variant]]
    results = json.load(open(os.path.join(run_dir, "results.json")))
    assert [e[0] for e in results["evals"]] == [50, 100] and math.isfinite(results["final_normalized_score"])
    assert [len(r) for r in results["eval_returns"]] == [1, 1]  # per-episode returns of every periodic evaluation
    final = results["final_eval"]  # the score: its own evaluation of the last policy, on seeds no periodic one uses
    assert final["step"] == 100 and final["episodes"] == len(final["returns"]) == len(final["normalized_scores"]) == 3
    assert results["final_normalized_score"] == pytest.approx(sum(final["normalized_scores"]) / 3)
    assert final["seed"] == 1 + training.FINAL_EVAL_SEED and 0 < results["target_data_normalized_score"] < 150
    assert "final score (the 3-episode evaluation" in proc.stdout
    assert torch.load(os.path.join(run_dir, "stage5.pt"), weights_only=False)["step"] == 100
    if variant in ("v2a", "dvdf"):
        assert "filter/adv" in open(glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))[0], "rb").read().decode("latin1")


# ---- stage 5's view of the data ---------------------------------------------------------------------------------
def fake_data(ds=2, da=1):
    """Two source episodes (lengths 3, 2) and two target episodes (2, 2), rows [s, a, r, s', d] with known numbers."""
    torch.manual_seed(0)
    data = torch.randn(9, 2 * ds + da + 2)
    data[:, ds + da] = torch.tensor([1.0, 1, 1, 5, 5, 2, 2, 0, 0])  # returns: source 3, 10; target 4, 0
    return dict(data=data, ds=ds, da=da, n_src=5, traj_len=torch.tensor([3, 2]), tgt_traj_len=torch.tensor([2, 2]))


def test_stage5_data_normalises_with_target_rows_and_scales_rewards():
    d = fake_data()
    ds, da, x = d["ds"], d["da"], d["data"]
    rows, stats = v2a_utils.stage5_data(d, True, "episode-range")
    mean, std = x[5:, :ds].mean(0), x[5:, :ds].std(0) + 1e-3  # the TARGET rows' statistics, for every row
    assert torch.allclose(rows[:, :ds], (x[:, :ds] - mean) / std)
    assert torch.allclose(rows[:, ds + da + 1: 2 * ds + da + 1], (x[:, ds + da + 1: 2 * ds + da + 1] - mean) / std)
    assert torch.allclose(rows[:, ds: ds + da], x[:, ds: ds + da]) and torch.equal(rows[:, -1], x[:, -1])
    # returns of all four episodes, source and target: 3, 10, 4, 0 -> range 10
    assert stats["reward_scale_factor"] == pytest.approx(100.0) and stats["episode_return_range"] == [0.0, 10.0]
    assert torch.allclose(rows[:, ds + da], x[:, ds + da] * 100.0)
    obs = x[:3, :ds]  # evaluation sees the transform the data got
    assert torch.allclose(v2a_utils.normalized_observation(stats)(obs), rows[:3, :ds])
    raw, none = v2a_utils.stage5_data(d, False, "none")  # the release's flags: the rows as they are
    assert torch.equal(raw, x) and none == {} and torch.equal(v2a_utils.normalized_observation(none)(obs), obs)


def test_bc_is_the_actors_regression_alone():
    """--variant bc: IQL's actor loss with every advantage weight 1 is the plain squared error of tanh(mean)."""
    mean, a = torch.randn(8, 3), torch.rand(8, 3) * 2 - 1
    assert v.awr_actor_loss(mean, a, torch.zeros(8), 0.0).item() == pytest.approx(F.mse_loss(torch.tanh(mean), a).item())
    assert v.awr_effective_fraction(torch.zeros(8), 3.0).item() == pytest.approx(1.0)
    assert v.awr_effective_fraction(torch.tensor([10.0] + [-10.0] * 7), 3.0).item() == pytest.approx(1 / 8, rel=1e-3)


@pytest.mark.parametrize("script", SCRIPTS)
def test_bc_trains_the_actor_only(script, tiny_data, tmp_path):
    proc, run_dir = run_variant(script, tmp_path, tiny_data, "bc")
    check_run("bc", proc, run_dir)
    ck = torch.load(os.path.join(run_dir, "stage5.pt"), weights_only=False)
    assert "actor" in ck and "qf" not in ck and len(ck["opts"]) == 1
    stats = json.load(open(os.path.join(run_dir, "args.json")))["stage5_data"]
    # TD3+BC normalises the states by default (as TD3+BC prescribes); IQL feeds raw states (as the release)
    assert (len(stats["state_mean"]) == 11) if script == "v2a_td3bc" else stats == {}


def test_normalisation_flags_are_part_of_the_stage5_key(v2a_run, tiny_data):
    """--resume refuses other normalisation flags than the run's (its stage 5 trained on other rows). --reuse-stages
    does not: stages 1-4 see the raw rows whatever these flags say."""
    script, cwd, _, run_dir = v2a_run
    other = "--no-normalize-states" if "td3bc" in script else "--normalize-states"
    for flag, value in ((other, []), ("--reward-scale", ["episode-range"])):
        proc = run(script, cwd, *tiny_data["base_args"], *TINY_BUDGETS, flag, *value, "--resume", run_dir, check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert flag.replace("no-", "") in proc.stderr.splitlines()[-1]


def test_sql_gamma_keeps_stage_3_when_the_backbone_discount_changes(v2a_run, tiny_data):
    """--gamma alone also changes stage 3's SQL (the release's single discount), so --reuse-stages refuses a run made at
    another --gamma; with --sql-gamma at the run's value it loads stages 1-4 and trains stage 5 with the new --gamma."""
    script, cwd, _, run_dir = v2a_run
    proc = run(script, cwd, *tiny_data["base_args"], *TINY_BUDGETS, "--gamma", "0.999", "--reuse-stages", run_dir,
               check=False)
    assert proc.returncode != 0 and "stage3.gamma 0.99 (now 0.999)" in proc.stderr.splitlines()[-1]
    proc = run(script, cwd, *tiny_data["base_args"], *TINY_BUDGETS, "--gamma", "0.999", "--sql-gamma", "0.99",
               "--reuse-stages", run_dir, "--exp-name", "sqlgamma")
    assert all(f"[stage {k}] loaded" in proc.stdout for k in (1, 2, 3, 4)) and "[stage 3 SQL" not in proc.stdout
    (new_args,) = [json.load(open(p)) for p in glob.glob(os.path.join(cwd, "runs", "*__sqlgamma__*", "args.json"))]
    assert (new_args["gamma"], new_args["sql_gamma"]) == (0.999, 0.99)


def test_resume_and_reuse_stages(v2a_run, tiny_data):
    script, cwd, _, run_dir = v2a_run
    proc = run(script, cwd, *tiny_data["base_args"], *STAGE_BUDGETS, "--no-compile", "--total-steps", "150",
               "--eval-freq", "50", "--eval-episodes", "1", "--resume", os.path.relpath(run_dir, cwd))
    for k in (1, 2, 3, 4, 5):
        assert f"[stage {k}] loaded" in proc.stdout
    assert "resuming from step 100" in proc.stdout and "[stage 1 TC-ELBO]" not in proc.stdout
    assert torch.load(os.path.join(run_dir, "stage5.pt"), weights_only=False)["step"] == 150
    assert [e[0] for e in json.load(open(os.path.join(run_dir, "results.json")))["evals"]] == [50, 100, 150]
    proc = run(script, cwd, *tiny_data["base_args"], *TINY_BUDGETS, "--tradeoff", "0.3", "--reuse-stages", run_dir)
    assert all(f"[stage {k}] loaded" in proc.stdout for k in (1, 2, 3, 4)) and "lambda 0.3" in proc.stdout
    assert "[stage 5] loaded" not in proc.stdout and "[stage 3 SQL" not in proc.stdout
