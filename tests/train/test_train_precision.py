"""``placerank train --precision``: the forward under bf16 autocast, the losses, the master
weights, their gradients and the optimizer in float32 (placerank/train/precision.py)."""

from __future__ import annotations

import json

import pytest
import torch

from placerank.cli import main as cli_main
from placerank.errors import PlaceRankError
from placerank.train.precision import TrainPrecision, resolve_train_precision, to_fp32

pytestmark = pytest.mark.usefixtures("single_thread")
CPU = torch.device("cpu")


def _gardens_batch(gardens, preprocess, places: int = 4):
    """``places`` GardensPoint frames x (day_left, day_right): a P x 2 batch ordered by place."""
    from placerank.data.images import load_tensor

    images, labels = [], []
    for p in range(places):
        for trav in ("day_left", "day_right"):
            images.append(load_tensor(gardens / trav / f"Image{10 * p:03d}.jpg", preprocess)[0])
            labels.append(p)
    return torch.stack(images), torch.tensor(labels)


def _check_fp32_update(params, before, what: str) -> None:
    """Every parameter and gradient float32, every gradient finite, the step moved the weights."""
    assert all(p.dtype == torch.float32 for p in params), what
    grads = [p.grad for p in params if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and bool(torch.isfinite(g).all()) for g in grads), what
    assert any(not torch.equal(p.detach(), b) for p, b in zip(params, before)), what


def test_fol_bf16_step_fp32_sinkhorn_loss_grads_and_weights(make_model, gardens):
    """One FoL step as the loop runs it: the backbone's map is bf16 (autocast is on), the
    Sinkhorn plan, every loss term and the gradients are float32, AdamW updates float32 weights."""
    from placerank.train.fol import fol_batch_loss, fol_forward
    from placerank.train.losses.fol import FoLCriterion, FoLLossConfig
    from placerank.train.losses.fol_adapt import adapt_loss_config, head_parameters, shared_parameters

    model = make_model("fol-effnet-lite0", image_size=(128, 224)).train()
    images, labels = _gardens_batch(gardens, model.preprocess)
    params = model.trainable_parameters()
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=3e-4)
    loss_cfg = adapt_loss_config(FoLLossConfig(grad_log_every=0), "fol-effnet-lite0", {})
    criterion = FoLCriterion(loss_cfg, shared_parameters(model), head_parameters(model))
    prec = TrainPrecision("bf16", CPU)
    with prec.autocast():
        out, local_map = fol_forward(model, images)
    assert out.feature_map.dtype == torch.bfloat16  # the forward did run in bf16
    assert out.plan.dtype == torch.float32 and out.keep_mass.dtype == torch.float32  # Sinkhorn: fp32
    with prec.full():
        loss, record = fol_batch_loss(model, criterion, *prec.fp32((out, local_map)), labels, "center")
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and record["loss"] > 0
    optimizer.zero_grad(set_to_none=True)
    prec.backward(loss)
    prec.step(optimizer)
    _check_fp32_update(params, before, "fol")
    assert all(v.dtype == torch.float32 for s in optimizer.state.values() for v in s.values() if v.dim())


def test_sinkhorn_and_losses_stay_fp32_under_autocast():
    """Under bf16 autocast the optimal transport of bf16 logits is float32, and the loss region
    (:meth:`TrainPrecision.full` on :func:`to_fp32` inputs) computes SARE / soft losses in float32
    whose value matches the float32 computation of the same (bf16-rounded) inputs exactly."""
    from placerank.models.fol_aggregator import sinkhorn_log
    from placerank.train.losses.sfrs import sare_ind_loss, soft_region_loss

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 8, 30, generator=g).bfloat16()
    dustbin = torch.randn(2, 30, generator=g).bfloat16()
    prec = TrainPrecision("bf16", CPU)
    with prec.autocast():
        log_p = sinkhorn_log(scores, dustbin, 3)
        a, p, n = (torch.nn.functional.linear(torch.randn(k, 16, generator=g), torch.eye(16)) for k in (1, 1, 10))
        assert a.dtype == torch.bfloat16  # a linear under autocast: bf16, as the network's outputs
        with prec.full():
            a32, p32, n32 = prec.fp32((a, p, n))
            hard = sare_ind_loss(a32[0], p32[0], n32, 0.07)
            soft = soft_region_loss(n32[:, :9], n32[:, 1:10])
    assert log_p.dtype == torch.float32
    # every column of the full plan sums to 1 (marginals held in fp32)
    assert torch.allclose(log_p.exp().sum(dim=1), torch.ones(2, 30), atol=1e-5)
    assert hard.dtype == torch.float32 and soft.dtype == torch.float32
    ref = sare_ind_loss(a.float()[0], p.float()[0], n.float(), 0.07)
    assert float(hard) == float(ref)


def test_selavpr_and_sfrs_bf16_steps_update_fp32_weights(make_model, gardens):
    """SelaVPR's train_step and SFRS's forward under bf16: float32 outputs into the losses,
    finite float32 gradients, float32 weights that move."""
    from placerank.train.losses.selavpr import SelaVPRLossConfig
    from placerank.train.losses.sfrs import sare_ind_loss
    from placerank.train.selavpr_mining import train_step
    from placerank.train.sfrs_step import SFRSForward

    prec = TrainPrecision("bf16", CPU)
    sela = make_model("selavpr-effnet-lite0", image_size=(128, 224))
    images, _ = _gardens_batch(gardens, sela.preprocess)  # tuples (q, p, n, n) of its places below
    params = sela.trainable_parameters()
    with torch.no_grad():
        for p in params:  # zero-initialised adapters: give them weight so every gradient is non-zero
            p.add_(0.01 * torch.randn_like(p))
    before = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=1e-3)
    batch, config = images[[0, 1, 2, 4, 2, 3, 4, 6]], SelaVPRLossConfig(margin=2.0)  # margin 2: every triplet counts
    parts = train_step(sela, batch, opt, 2, config, prec=prec)
    assert parts["loss"] > 0 and all(torch.isfinite(torch.tensor(v)) for v in parts.values())
    _check_fp32_update(params, before, "selavpr")

    sfrs = make_model("sfrs-effnet-lite0", image_size=(128, 224))
    sfrs.set_pca(None)
    sfrs.set_trainable()
    student = SFRSForward(sfrs, prec)
    v = student(images[:4], output="vlad")
    r = student(images[:4], output="regions")
    assert v.dtype == torch.float32 and r.dtype == torch.float32 and r.shape[:2] == (4, 9)
    with torch.no_grad():  # the fp32 forward of the same model: bf16 moves the VLAD only slightly
        ref = sfrs(images[:4], output="vlad")
    assert float(torch.nn.functional.cosine_similarity(v.detach(), ref).min()) > 0.99
    params = sfrs.trainable_parameters()
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.1)
    loss = sare_ind_loss(v[0], v[1], v[2:], 0.07)
    assert loss.dtype == torch.float32
    prec.backward(loss)
    prec.step(opt)
    _check_fp32_update(params, before, "sfrs")


def test_precision_choices_and_to_fp32():
    assert resolve_train_precision("bf16", "fol", CPU) == "bf16"
    assert resolve_train_precision("fp32", "sfrs", CPU) == "fp32"
    assert resolve_train_precision("auto", "selavpr", CPU) == "bf16"  # measured: held recall and loss
    assert resolve_train_precision("auto", "sfrs", CPU) == "fp32"  # not measured: fp32
    with pytest.raises(PlaceRankError, match=r"^--precision half: use one of auto, fp32, bf16, fp16$"):
        resolve_train_precision("half", "fol", CPU)
    with pytest.raises(PlaceRankError, match=r"^--precision auto: use one of"):
        TrainPrecision("auto", CPU)  # a concrete precision only
    fp32 = TrainPrecision("fp32", CPU)
    x = torch.ones(2, dtype=torch.bfloat16)
    assert fp32.fp32(x) is x and not fp32.scaler.is_enabled()  # fp32: nothing changes
    out = to_fp32({"a": [x, torch.arange(3)], "b": (x,), "c": 1})
    assert out["a"][0].dtype == torch.float32 and out["a"][1].dtype == torch.int64 and out["c"] == 1


def test_fp16_on_cpu_is_one_line_exit_2(gardens, tmp_path, capsys):
    code = cli_main(
        ["train", "--method", "fol", "--train", str(gardens / "day_left"), str(gardens / "day_right")]
        + ["--out", str(tmp_path / "run"), "--device", "cpu", "--precision", "fp16"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert (code, err) == (
        2,
        [
            "placerank: error: --precision fp16 trains on CUDA only (it needs a GradScaler; the device is cpu);"
            " use --precision bf16 or fp32"
        ],
    )
    assert not (tmp_path / "run").exists()  # refused before a run folder was made


def test_precision_is_recorded_in_the_run_folder(gardens, tmp_path, capsys):
    """A real 2-step bf16 FoL run: config.json and the log's start line say bf16; ``auto`` is
    recorded as the precision it resolved to (bf16 for FoL on CPU, benchmarks/train_precision.py)."""
    base = ["train", "--method", "fol", "--preset", "none", "--device", "cpu", "--workers", "0"]
    base += ["--train", *(str(gardens / t) for t in ("day_left", "day_right")), "--frames", "0", "40"]
    base += ["--image-size", "128", "224", "--places-per-batch", "4", "--option", "max_steps=2"]
    assert cli_main([*base, "--out", str(tmp_path / "bf16"), "--precision", "bf16"]) == 0
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    log = [json.loads(l) for l in (tmp_path / "bf16" / "log.jsonl").read_text().splitlines()]
    start = next(r for r in log if r.get("event") == "start")
    steps = [r for r in log if "ms" in r]
    assert config["precision"] == "bf16" and start["precision"] == "bf16"
    assert len(steps) == 2 and all(r["loss"] == r["loss"] for r in steps)  # finite, logged
    assert (tmp_path / "bf16" / "model.pt").exists()
    assert cli_main([*base, "--out", str(tmp_path / "auto"), "--precision", "auto", "--option", "max_steps=1"]) == 0
    auto = json.loads((tmp_path / "auto" / "config.json").read_text())["precision"]
    assert auto == resolve_train_precision("auto", "fol", CPU) == "bf16"  # the measured choice for FoL on CPU
