"""Layer-wise MI analysis: MINE on Gaussians with known MI, fresh networks per estimate, the clustering
estimator, CCA, hidden-state collection from patch and waveform models, the CLI."""

import json
import math

import pytest
import torch

import ssamba
from ssamba.analysis import hidden, mi
from ssamba.analysis.layerwise import pca


def gaussians(n: int, d: int, rho: float, seed: int):
    """x ~ N(0, I_d), t = rho x + sqrt(1 - rho^2) e: I(X; T) = -d/2 log(1 - rho^2)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, rho * x + math.sqrt(1 - rho**2) * torch.randn(n, d, generator=g)


@pytest.fixture(autouse=True)
def one_thread():
    # tiny MLPs: a second thread only adds contention on a shared CPU
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_mine_matches_known_gaussian_mi():
    x, t = gaussians(3000, 2, 0.8, seed=0)
    true = -0.5 * 2 * math.log(1 - 0.8**2)  # 1.02 nats
    result = mi.mine_seeds(x, t, seeds=(0, 1, 2))
    assert abs(result["mean"] - true) / true < 0.10, (result, true)
    assert result["std"] < 0.1 * true
    assert len(result["values"]) == 3


def test_mine_plain_dv_gradient_also_works():
    x, t = gaussians(3000, 1, 0.9, seed=1)
    true = -0.5 * math.log(1 - 0.9**2)
    est = mi.mine_mi(x, t, seed=0, ema=None)
    assert abs(est - true) / true < 0.15


def test_mine_independent_is_about_zero():
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(3000, 4, generator=g), torch.randn(3000, 4, generator=g)
    est = mi.mine_mi(x, t, seed=0)
    assert abs(est) < 0.05


def test_mine_reproducible_and_fresh_per_estimate():
    x, t = gaussians(1000, 2, 0.7, seed=0)
    other_x, other_t = gaussians(1000, 2, 0.95, seed=5)
    kw = dict(steps=150, eval_every=50)
    first = mi.mine(x, t, seed=4, **kw)
    # an estimate on other data in between must not change this one: nothing is carried between estimates
    mi.mine(other_x, other_t, seed=4, **kw)
    again = mi.mine(x, t, seed=4, **kw)
    assert again.mi == first.mi and again.history == first.history
    assert mi.mine(x, t, seed=5, **kw).mi != first.mi
    # the global RNG is untouched (the network is initialised inside a forked RNG)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    mi.mine(x, t, seed=4, **kw)
    assert torch.equal(torch.rand(3), expected)


def test_mine_initialisation_comes_from_the_seed(monkeypatch):
    """Two estimates with different seeds start from different networks; the same seed from the same one."""
    inits = []
    original = mi.StatisticsNetwork.__init__

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        inits.append(self.net[0].weight.detach().clone())

    monkeypatch.setattr(mi.StatisticsNetwork, "__init__", record)
    x, t = gaussians(200, 2, 0.5, seed=0)
    for seed in (0, 0, 1):
        mi.mine(x, t, seed=seed, steps=1)
    assert torch.equal(inits[0], inits[1]) and not torch.equal(inits[0], inits[2])


def test_mine_grouped_split_keeps_groups_apart():
    groups = torch.arange(100).repeat_interleave(6)
    train, held = mi.split_indices(600, 0.3, seed=0, groups=groups)
    assert not set(groups[train].tolist()) & set(groups[held].tolist())
    assert len(train) + len(held) == 600 and len(set(groups[held].tolist())) == 30


def test_mine_bad_input_errors():
    x = torch.randn(10, 2)
    with pytest.raises(ValueError, match="same number of frames"):
        mi.mine_mi(x, torch.randn(11, 2))
    with pytest.raises(ValueError, match="x must be"):
        mi.mine_mi(torch.randn(10), torch.randn(10, 2))
    with pytest.raises(ValueError, match="NaN"):
        mi.mine_mi(x, torch.full((10, 2), float("nan")))
    with pytest.raises(ValueError, match="held_out"):
        mi.mine_mi(x, x, held_out=1.5)


def separable(n_per: int, classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, 8, generator=g) * 20
    labels = torch.arange(classes).repeat_interleave(n_per)
    return centres[labels] + torch.randn(len(labels), 8, generator=g), labels


def test_discrete_mi_is_one_on_separable_labels():
    t, y = separable(60, 5, seed=0)
    assert mi.discrete_mi(t, y, k=5, seed=0) == pytest.approx(1.0, abs=1e-9)
    # more clusters than classes: still pure clusters, still 1
    assert mi.discrete_mi(t, y, k=12, seed=1) == pytest.approx(1.0, abs=1e-9)


def test_discrete_mi_near_zero_for_unrelated_labels_and_reproducible():
    t, _ = separable(200, 5, seed=0)
    y = torch.randint(0, 5, (t.shape[0],), generator=torch.Generator().manual_seed(9))
    value = mi.discrete_mi(t, y, k=5, seed=0)
    assert value < 0.05
    assert mi.discrete_mi(t, y, k=5, seed=0) == value
    with pytest.raises(ValueError, match="single class"):
        mi.discrete_mi(t, torch.zeros(t.shape[0], dtype=torch.long), k=3)
    with pytest.raises(ValueError, match="integer"):
        mi.discrete_mi(t, y.float(), k=3)


def test_kmeans_finds_separated_clusters():
    from ssamba.pretrain.kmeans import sq_dist

    t, y = separable(50, 4, seed=2)
    centres = mi.kmeans(t, 4, seed=0)
    assign = sq_dist(t, centres).argmin(1)
    # every true class maps to exactly one cluster
    assert all(len(set(assign[y == c].tolist())) == 1 for c in range(4))
    assert len(set(assign.tolist())) == 4
    assert torch.equal(mi.kmeans(t, 4, seed=0), centres)


def test_cca_recovers_correlations():
    x, t = gaussians(4000, 3, 0.6, seed=0)
    result = mi.cca(x, t)
    assert all(abs(r - 0.6) < 0.05 for r in result["correlations"])
    assert result["gaussian_mi"] == pytest.approx(-1.5 * math.log(1 - 0.36), rel=0.15)


def test_pca_keeps_leading_components():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(500, 6, generator=g) * torch.tensor([10.0, 5.0, 1, 0.1, 0.1, 0.1])
    r = pca(v, 2)
    assert r.shape == (500, 2)
    assert r.var(0).sum() / v.var(0).sum() > 0.99
    assert pca(v, 0) is v


# ----------------------------------------------------------------------------------- hidden states


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Eight short WAV clips of two classes with a manifest and a label CSV."""
    import numpy as np
    import soundfile as sf

    from ssamba.data import Example, LabelSet, write_manifest

    root = tmp_path_factory.mktemp("mi_clips")
    rng = np.random.default_rng(0)
    examples = []
    for i in range(8):
        label = "lo" if i % 2 else "hi"
        freq = 300 if label == "lo" else 3000
        n = 8000 + 800 * i  # 0.5 .. 0.85 s
        wave = 0.3 * np.sin(2 * np.pi * freq * np.arange(n) / 16000) + 0.01 * rng.standard_normal(n)
        path = root / f"c{i}.wav"
        sf.write(path, wave.astype("float32"), 16000)
        examples.append(Example(path=str(path), labels=(label,)))
    write_manifest(root / "m.json", examples)
    LabelSet(["hi", "lo"]).to_csv(root / "labels.csv")
    return root


def _spec_model(tmp_path, family="ssamba"):
    torch.manual_seed(7)  # not 0: the random:PATH baseline with seed 0 must differ from these weights
    name = "ssamba_tiny" if family == "ssamba" else "ssast_tiny"
    model = ssamba.create_model(name, depth=2, embed_dim=32, input_tdim=80, **({"num_heads": 2} if family == "ssast"
                                                                                  else {"d_state": 4}))
    return model.save_pretrained(tmp_path / family)


@pytest.mark.parametrize("group", ["concat", "mean", "patch"])
def test_collect_hidden_patch_model_frames(clips, tmp_path, group):
    from ssamba.data import LabelSet

    folder = _spec_model(tmp_path)
    model, resolved = hidden.load_model(str(folder))
    assert resolved == folder
    feats = hidden.collect_hidden(model, clips / "m.json", labels=LabelSet.from_csv(clips / "labels.csv"),
                                  group=group, batch_size=3)
    # clip i has ~50 + 5 i frames cut to input_tdim 80 -> (len - 16) // 16 + 1 time columns of 8 patches
    lengths = [min(80, ssamba.features.num_frames(8000 + 800 * i)) for i in range(8)]
    cols = [(n - 16) // 16 + 1 for n in lengths]
    per = 8 if group == "patch" else 1
    assert feats.x.shape[0] == sum(cols) * per
    assert feats.x.shape[1] == {"concat": 8 * 256, "mean": 256, "patch": 256}[group]
    assert len(feats.layers) == 1  # depth 2 = one forward/backward pair
    assert feats.layers[0].shape == (feats.x.shape[0], {"concat": 8 * 32, "mean": 32, "patch": 32}[group])
    assert feats.labels.tolist() == [i % 2 for i, c in enumerate(cols) for _ in range(c * per)]  # hi=0, lo=1
    assert feats.utterance.unique().numel() == 8
    if group != "patch":
        # the groups agree: averaging the concatenated column's 8 patch vectors gives the "mean" frame
        other = hidden.collect_hidden(model, clips / "m.json", group="concat" if group == "mean" else "mean")
        concat, mean = (feats, other) if group == "concat" else (other, feats)
        torch.testing.assert_close(concat.x.reshape(-1, 8, 256).mean(1), mean.x)
        torch.testing.assert_close(concat.layers[0].reshape(-1, 8, 32).mean(1), mean.layers[0])


def test_collect_hidden_layer_x_and_batch_independence(clips, tmp_path):
    folder = _spec_model(tmp_path, "ssast")
    model, _ = hidden.load_model(str(folder))
    a = hidden.collect_hidden(model, clips / "m.json", x="layer:0", batch_size=8)
    b = hidden.collect_hidden(model, clips / "m.json", x="layer:0", batch_size=1)
    assert len(a.layers) == 2 and torch.equal(a.x, a.layers[0])
    torch.testing.assert_close(a.layers[1], b.layers[1], atol=1e-4, rtol=1e-4)  # padding never leaks in
    with pytest.raises(ValueError, match="layer:5"):
        hidden.collect_hidden(model, clips / "m.json", x="layer:5")
    with pytest.raises(ValueError, match="x must be"):
        hidden.collect_hidden(model, clips / "m.json", x="inputs")


def test_load_model_random_and_run_folders(tmp_path):
    folder = _spec_model(tmp_path)
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    for f in folder.iterdir():
        (run / "final" / f.name).write_bytes(f.read_bytes())
    trained, resolved = hidden.load_model(str(run))
    assert resolved == run / "final"
    r0, _ = hidden.load_model(f"random:{run}", seed=0)
    r0b, _ = hidden.load_model(f"random:{run}", seed=0)
    r1, _ = hidden.load_model(f"random:{run}", seed=1)
    key = "layers.0.mixer.in_proj.weight"
    assert torch.equal(r0.state_dict()[key], r0b.state_dict()[key])
    assert not torch.equal(r0.state_dict()[key], r1.state_dict()[key])
    assert not torch.equal(r0.state_dict()[key], trained.state_dict()[key])
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        hidden.resolve_checkpoint(tmp_path)


def test_collect_hidden_waveform_model(clips, tmp_path):
    from ssamba.models.hubert import create_hubert

    torch.manual_seed(0)
    folder = create_hubert("extbimamba", "tiny").save_pretrained(tmp_path / "hubert")
    model, _ = hidden.load_model(str(folder))
    feats = hidden.collect_hidden(model, clips / "m.json", batch_size=4)
    frames = [(8000 + 800 * i - 400) // 320 + 1 for i in range(8)]  # 20 ms frames
    assert feats.x.shape == (sum(frames), 78)  # two 10 ms MFCC+delta frames per model frame
    assert len(feats.layers) == 2 and feats.layers[0].shape == (sum(frames), 32)
    cnn = hidden.collect_hidden(model, clips / "m.json", x="cnn", batch_size=4)
    assert cnn.x.shape == (sum(frames), 32)
    with pytest.raises(ValueError, match="group"):
        hidden.collect_hidden(model, clips / "m.json", group="mean")


def test_analyze_mi_cli_end_to_end(clips, tmp_path):
    from ssamba.cli import main

    folder = _spec_model(tmp_path)
    out = tmp_path / "out"
    rc = main(["analyze", "mi", "--panel", "A", "--model", f"trained={folder}", "--model", f"random=random:{folder}",
               "--panel", "B", "--ckpt", str(folder), "--data", str(clips / "m.json"),
               "--labels", str(clips / "labels.csv"), "--out", str(out), "--seeds", "0,1", "--steps", "30",
               "--dims", "4", "--k", "2", "--held-out", "0.5", "--cca"])
    assert rc == 0
    result = json.loads((out / "mi.json").read_text())
    assert [p["title"] for p in result["panels"]] == ["A", "B"]
    assert [m["label"] for m in result["panels"][0]["models"]] == ["trained", "random"]
    assert result["panels"][1]["models"][0]["label"] == "ssamba"
    first = result["panels"][0]["models"][0]
    assert len(first["mine"]) == 1 and len(first["mine"][0]["values"]) == 2
    assert 0.0 <= first["discrete"][0]["mean"] <= 1.0 and first["cca"]
    # the same checkpoint under two labels: computed once, reused from out/models/ (same weights, data, settings)
    assert result["panels"][1]["models"][0]["mine"] == first["mine"]
    assert len(list((out / "models").glob("*.json"))) == 2
    pytest.importorskip("matplotlib")
    assert (out / "mi.png").stat().st_size > 0
    assert main(["analyze", "mi", "--model", "nolabel", "--data", str(clips / "m.json"), "--out", str(out)]) == 2


def test_hubert_ctc_run_exposes_encoder_and_conformer_layers(clips, tmp_path):
    from ssamba.models.heads import CTCHead, save_head
    from ssamba.models.hubert import create_hubert

    torch.manual_seed(0)
    encoder = create_hubert("extbimamba", "tiny")
    head = CTCHead(encoder, 6, None, conformer_layers=1, conformer_dim=16, conformer_heads=2, conformer_kernel=3)
    run = tmp_path / "ctc"
    save_head(head, run / "best")  # the head rebuilds from its own folder: no run config is read
    model, folder = hidden.load_model(str(run))
    assert folder == run / "best"
    feats = hidden.collect_hidden(model, clips / "m.json", batch_size=4)
    assert [h.shape[1] for h in feats.layers] == [32, 32, 16]  # two encoder layers, then the Conformer block
    head.eval()
    wave = torch.from_numpy(ssamba.load_audio(clips / "c0.wav"))[None]
    with torch.no_grad():
        enc = head.encoder.extract_features(wave)[0]
        ref = head.downstream[0](head.down_proj(head.encoder(wave)[0]), None)
    n = (8000 - 400) // 320 + 1
    torch.testing.assert_close(feats.layers[1][:n], enc[1][0])
    torch.testing.assert_close(feats.layers[2][:n], ref[0])
