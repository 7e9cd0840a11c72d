"""Tests for mae_vit.py: each part of the paper on its own, then the real command line
on small CIFAR-format datasets written to a temporary folder. CPU only, no network."""

import functools
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
import urllib.error
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
import torchvision.transforms.v2 as T2
import torchvision.transforms.functional as TF
from torchvision.datasets.utils import calculate_md5

import mae_vit as M

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------- helpers
def write_cifar(root, name="cifar10", per_batch=20, test=40, seed=0, colours=False):
    """A tiny dataset in the on-disk CIFAR format that torchvision's CIFAR10 / CIFAR100 read:
    pickled dicts with `data` (uint8, N x 3072) and labels, and the label names. Images are
    smooth colour gradients so they can be learned; the label is the dominant channel (plus
    noise classes for CIFAR-100). torchvision checks each file against the md5 of the real
    set, so the folder also gets md5.json with these files' own sums (see offline_cifar). colours=True: each class is
    one colour of its own, with a little noise, so that the classes are separable."""
    kind = getattr(torchvision.datasets, name.upper())
    classes, label_key = (10, "labels") if name == "cifar10" else (100, "fine_labels")
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, kind.base_folder)
    os.makedirs(folder, exist_ok=True)

    def batch(n):
        labels = rng.integers(0, classes, n)
        yy, xx = np.mgrid[0:32, 0:32] / 31.0
        imgs = np.zeros((n, 3, 32, 32))
        for i, label in enumerate(labels):
            if colours:
                imgs[i] = np.array([label % 3, label // 3 % 3, label // 9])[
                    :, None, None
                ] / 2.2 + rng.uniform(0, 0.05, (3, 32, 32))
                continue
            a, b, c = rng.uniform(0.2, 1.0, 3)
            imgs[i, label % 3] = a * xx + (1 - a) * yy
            imgs[i, (label + 1) % 3] = b * yy
            imgs[i, (label + 2) % 3] = c * 0.3
        data = (imgs * 255).astype(np.uint8).reshape(n, 3072)
        return {"data": data, label_key: [int(v) for v in labels]}

    contents = {
        f: batch(per_batch if name == "cifar10" else per_batch * 5) for f, _ in kind.train_list
    }
    contents.update({f: batch(test) for f, _ in kind.test_list})
    contents[kind.meta["filename"]] = {kind.meta["key"]: [f"class {i}" for i in range(classes)]}
    for f, content in contents.items():
        with open(os.path.join(folder, f), "wb") as fh:
            pickle.dump(content, fh)
    sums = {f: calculate_md5(os.path.join(folder, f)) for f in contents}
    with open(os.path.join(folder, "md5.json"), "w") as fh:
        json.dump(sums, fh)
    return root


def offline_cifar():
    """What the tests run the program with, in this process and in the ones they start:
    torchvision's integrity check compares a file with the md5 that write_cifar recorded
    beside it (a file changed after it was written fails, as a corrupt download does), and
    a download fails at once, as on a machine without internet."""

    def check_integrity(fpath, md5=None):
        try:
            with open(os.path.join(os.path.dirname(fpath), "md5.json")) as fh:
                return json.load(fh).get(os.path.basename(fpath)) == calculate_md5(fpath)
        except OSError:
            return False

    def no_download(*args, **kwargs):
        raise urllib.error.URLError("the tests run offline")

    torchvision.datasets.cifar.check_integrity = check_integrity
    torchvision.datasets.cifar.download_and_extract_archive = no_download


offline_cifar()  # for every test in this process

# `python mae_vit.py ARGS`, as a user runs it, but with offline_cifar() applied first.
# Python's own Ctrl-C handler is installed too: a process started from a script in the background
# (`pytest &`) inherits SIGINT ignored, where a terminal's has it.
SCRIPT = os.path.join(HERE, "mae_vit.py")
LAUNCH = [
    "-c",
    f"import sys; sys.path.insert(0, {HERE!r}); import signal, runpy, test_mae_vit; "
    "test_mae_vit.offline_cifar(); signal.signal(signal.SIGINT, signal.default_int_handler); "
    f"sys.argv[0] = 'mae_vit.py'; runpy.run_path({SCRIPT!r}, run_name='__main__')",
]


def cli(*parts):
    """A command line written as flags in one string ("--epochs 1 --batch-size 8"), with the values
    that may hold spaces (paths) given apart: strings that start with "-" are split into words."""
    argv = []
    for part in parts:
        if part.startswith("-"):
            argv += part.split()
        else:
            argv.append(part)
    return argv


def run_cli(*args, check=True):
    r = subprocess.run(
        [sys.executable, *LAUNCH, *cli(*args)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def summary(r):
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_main(capsys, *args):
    """The CLI in this process: main() as `python mae_vit.py` runs it, without the ~5 s of
    a new interpreter importing torch. Returns the JSON summary and the rest of stdout."""
    assert M.main(cli(*args)) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    return json.loads(out.strip().splitlines()[-1]), out


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_cifar(str(tmp_path_factory.mktemp("data")), per_batch=6, test=10)  # 30 images


TINY = cli("--epochs 2 --warmup-epochs 1 --batch-size 8 --num-workers 0")


@pytest.fixture(autouse=True)
def own_current_folder(tmp_path_factory, monkeypatch):
    """Each test runs in an empty current folder of its own, so that a user's runs/ or data/ in the
    checkout never changes a result, and no test writes there."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


# ---------------------------------------------------------------- patchifier (§3)
def test_patchify_round_trip_and_layout():
    x = torch.randn(2, 3, 36, 36)
    p = M.patchify(x)
    assert p.shape == (2, 144, 27)
    assert torch.equal(M.unpatchify(p), x)
    # patch 13 is row 1, column 1 of the 12 x 12 grid: pixels 3..5 x 3..5, channel first
    assert torch.equal(p[1, 13], x[1, :, 3:6, 3:6].reshape(27))


# ---------------------------------------------------------------- block, parameters, bias rule (§3.1)
def test_parameter_counts_match_the_paper():
    assert M.count_parameters(M.Classifier(10)) == 3_636_490  # Table 3: 3.64 M
    assert M.count_parameters(M.Classifier(100)) == 3_653_860
    assert M.count_parameters(M.MAE().decoder) == 1_221_696
    mae = M.MAE()
    assert M.count_parameters(mae) == 3_636_490 - 1930 + 1_221_696


def test_bias_only_inside_transformer_layers():
    mae = M.MAE()
    for name, m in mae.named_modules():
        if isinstance(m, nn.Linear):
            assert (m.bias is not None) == (".blocks." in name), name
    block = mae.encoder.blocks[0]
    assert block.fc1.out_features == 384 and block.fc2.out_features == 192  # 2x expansion


def test_block_is_relu_mlp_and_dropout_only_in_training():
    torch.manual_seed(0)
    block = M.Block()
    x = torch.randn(2, 7, 192)
    block.eval()
    assert torch.equal(block(x), block(x))
    # hand-written reference of the pre-norm block
    q, k, v = block.qkv(block.norm1(x)).view(2, 7, 3, 3, 64).permute(2, 0, 3, 1, 4)
    att = torch.softmax(q @ k.transpose(-1, -2) / 8, -1) @ v
    y = x + block.proj(att.transpose(1, 2).reshape(2, 7, 192))
    y = y + block.fc2(torch.relu(block.fc1(block.norm2(y))))
    assert torch.allclose(block(x), y, atol=1e-5)
    block.train()
    assert not torch.equal(block(x), block(x))


def same_weights(block, layer):
    """Block's parameters beside nn.TransformerEncoderLayer's, in the same order."""
    return [
        (layer.self_attn.in_proj_weight, block.qkv.weight),
        (layer.self_attn.in_proj_bias, block.qkv.bias),
        (layer.self_attn.out_proj.weight, block.proj.weight),
        (layer.self_attn.out_proj.bias, block.proj.bias),
        (layer.linear1.weight, block.fc1.weight),
        (layer.linear1.bias, block.fc1.bias),
        (layer.linear2.weight, block.fc2.weight),
        (layer.linear2.bias, block.fc2.bias),
        (layer.norm1.weight, block.norm1.weight),
        (layer.norm1.bias, block.norm1.bias),
        (layer.norm2.weight, block.norm2.weight),
        (layer.norm2.bias, block.norm2.bias),
    ]


@pytest.mark.parametrize("norm_first", [True, False])
def test_block_is_pytorchs_encoder_layer_with_its_default_init(norm_first):
    """§3.1 names PyTorch's defaults. With the same weights, Block(norm_first) computes what
    nn.TransformerEncoderLayer(192, 3, 384, 0.1, norm_first) does, in eval mode exactly and in
    training mode under the same seed (dropout at the same four places), and its weights start
    from the same distributions: nn.MultiheadAttention's and nn.Linear's."""
    torch.manual_seed(0)
    block = M.Block(norm_first)
    layer = nn.TransformerEncoderLayer(192, 3, 384, 0.1, batch_first=True, norm_first=norm_first)
    pairs = same_weights(block, layer)
    assert len(pairs) == len(list(layer.parameters())) == len(list(block.parameters()))
    for theirs, ours in pairs:  # same defaults: equal where constant, same range where random
        assert theirs.shape == ours.shape
        assert theirs.abs().max().item() == pytest.approx(ours.abs().max().item(), rel=0.05)
        assert theirs.std().item() == pytest.approx(ours.std().item(), rel=0.1, abs=1e-6)
    with torch.no_grad():
        for theirs, ours in pairs:
            theirs.copy_(ours)
    x = torch.randn(2, 145, 192)
    assert torch.equal(block.eval()(x), layer.eval()(x))
    post = M.Block(not norm_first).eval()
    post.load_state_dict(block.state_dict())  # the same weights, strictly: only the flag differs
    assert not torch.allclose(post(x), block(x), atol=1e-2)
    # Training mode: PyTorch draws its first dropout's mask on a (N, B, D) layout, so one image
    x = x[:1]
    outputs = []
    for module in (block.train(), layer.train()):
        torch.manual_seed(1)
        outputs.append(module(x))
    assert torch.equal(*outputs)
    assert M.Encoder().pos_embed.std().item() == pytest.approx(1.0, abs=0.02)  # nn.Embedding's


def test_dropout_acts_on_the_attention_weights_in_training_only(monkeypatch):
    """With v all ones, softmax's weights summing to 1 give outputs of exactly 1; dropping 10%
    of the weights (the rest scaled by 1 / 0.9) gives outputs of 1 on average, not each. A Block
    asks for that dropout in training mode and for none in eval mode."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 3, 37, 64)
    v = torch.ones(4, 3, 37, 64)
    assert torch.allclose(M.attention(q, k, v, 0.0), v)
    dropped = M.attention(q, k, v, 0.1)
    assert not torch.allclose(dropped, v, atol=1e-2)
    assert dropped.mean().item() == pytest.approx(1.0, abs=0.01)
    asked = []

    def spy(q, k, v, dropout):
        asked.append(dropout)
        return M.F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)

    monkeypatch.setattr(M, "attention", spy)
    block = M.Block()
    x = torch.randn(2, 7, 192)
    block.train()(x)
    block.eval()(x)
    assert asked == [0.1, 0.0]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_attention_kernels_agree_with_the_math_kernel(dtype):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    compiled = torch.compile(M.attention, dynamic=False)
    for n in (37, 145):  # the memory-efficient kernel; PyTorch's pick (flash where it runs)
        q, k, v, grad = torch.randn(4, 64, 3, n, 64, device="cuda")
        exact = [t.clone().requires_grad_() for t in (q, k, v)]
        with sdpa_kernel(SDPBackend.MATH):
            out = F.scaled_dot_product_attention(*exact)
        out.backward(grad)
        for attention in (M.attention, compiled):
            fast = [t.to(dtype).requires_grad_() for t in (q, k, v)]
            o = attention(*fast, 0.0)
            o.backward(grad.to(dtype))
            for a, b in zip([o, *(t.grad for t in fast)], [out, *(t.grad for t in exact)]):
                assert (a.float() - b).norm() / b.norm() < 1e-2, n  # bf16: ~5e-3
            ones = torch.ones_like(fast[2])  # dropout on the weights: outputs 1 on average
            dropped = attention(fast[0], fast[1], ones, 0.1).float()
            assert dropped.std().item() > 0.01 and abs(dropped.mean().item() - 1) < 0.01, n
        with sdpa_kernel(SDPBackend.MATH):  # fp32 obeys an outer choice (the bench's reference)
            assert torch.equal(M.attention(q, k, v, 0.0), out.detach()), n


# ---------------------------------------------------------------- masking, encoder, decoder (§2)
def test_random_masking_keeps_36_unique_patches_and_the_dummy():
    torch.manual_seed(0)
    keep, restore, mask = M.random_masking(torch.rand(64, 144), 0.75)
    assert keep.shape == (64, 37) and restore.shape == (64, 144)
    assert (keep[:, -1] == 144).all()  # dummy always, last
    visible = keep[:, :-1]
    assert all(len(set(row.tolist())) == 36 for row in visible)  # 36 unique
    assert (visible < 144).all()  # dummy not maskable
    assert (mask.sum(1) == 108).all()
    assert (mask.gather(1, visible) == 0).all()  # kept = not masked
    # restore inverts the shuffle: [visible, masked] gathered by restore is image order
    shuffled = torch.cat([visible, torch.nonzero(mask)[:, 1].view(64, 108)], 1)
    order = torch.arange(144).expand(64, -1)
    shuffle = restore.argsort(1)
    assert torch.equal(shuffle.gather(1, restore), order)
    assert torch.equal(set_rows(shuffle[:, :36]), set_rows(visible))
    assert torch.equal(set_rows(shuffled), set_rows(order))
    # every patch is masked about 75% of the time (uniform)
    many = torch.stack([M.random_masking(torch.rand(1, 144), 0.75)[2][0] for _ in range(2000)])
    assert (many.mean(0) - 0.75).abs().max() < 0.1


def set_rows(t):
    return t.sort(1).values


def test_encoder_sees_kept_tokens_and_the_dummy_is_its_position():
    torch.manual_seed(0)
    enc = M.Encoder().eval()
    patches = torch.randn(2, 144, 27)
    keep, restore, mask = M.random_masking(torch.rand(2, 144), 0.75)
    assert enc(patches, keep).shape == (2, 37, 192)
    assert enc(patches).shape == (2, 145, 192)
    # the zero dummy through a bias-free embedding is exactly its positional embedding
    with torch.no_grad():
        emb = enc.patch_embed(torch.cat([patches, torch.zeros(2, 1, 27)], 1)) + enc.pos_embed
    assert torch.equal(emb[:, 144], enc.pos_embed[144].expand(2, -1))


def test_decoder_restores_image_order():
    torch.manual_seed(0)
    dec = M.Decoder()
    keep, restore, mask = M.random_masking(torch.rand(2, 144), 0.75)
    encoded = torch.randn(2, 37, 192)
    seen = {}
    dec.blocks[0].register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    assert dec(encoded, restore).shape == (2, 144, 27)
    x = seen["x"] - dec.pos_embed  # (2, 145, 192)
    for i in range(2):
        for j, token in enumerate(keep[i, :-1].tolist()):
            assert torch.allclose(x[i, token], encoded[i, j], atol=1e-6)
        masked = mask[i].nonzero()[:, 0]
        assert torch.allclose(x[i, masked], dec.mask_token.expand(108, -1), atol=1e-6)
        assert torch.allclose(x[i, 144], encoded[i, 36], atol=1e-6)  # dummy


# ---------------------------------------------------------------- loss (Eq. 1)
def test_loss_eq1_on_hand_made_tensors():
    target = torch.zeros(1, 144, 27)
    pred = torch.zeros(1, 144, 27)
    mask = torch.zeros(1, 144)
    mask[0, :108] = 1
    pred[0, :108] = 2.0  # masked error 4 per value
    pred[0, 108:] = 1.0  # visible error 1 per value
    assert M.mae_loss(pred, target, mask, 0.1).item() == pytest.approx(4 + 0.1 * 1)
    assert M.mae_loss(pred, target, mask, 0.0).item() == pytest.approx(4.0)
    pred[0, 0] = 5.0  # one masked patch: (25 + 107 * 4) / 108
    assert M.mae_loss(pred, target, mask, 0.0).item() == pytest.approx((25 + 107 * 4) / 108)


def test_mae_forward_loss_is_eq1_on_normalized_pixels():
    torch.manual_seed(0)
    mae = M.MAE().eval()
    images = torch.rand(2, 3, 36, 36) * 2 - 1
    torch.manual_seed(1)
    loss, pred, mask = mae(images)
    expected = M.mae_loss(pred, M.patchify(images), mask, 0.1)
    assert torch.allclose(loss, expected)
    assert pred.shape == (2, 144, 27)
    # given noise decides the mask: the 36 patches with the smallest draws stay visible
    noise = torch.rand(2, 144)
    loss1, _, mask1 = mae(images, noise)
    loss2, _, mask2 = mae(images, noise)
    assert torch.equal(mask1, mask2) and torch.equal(loss1, loss2)
    assert torch.equal(mask1, (noise > noise.sort(1).values[:, 35:36]).float())


def test_initial_loss_is_one_third_plus_the_targets_mean_square():
    """§3.1's default init makes the decoder's outputs start with a mean square of 1/3 in
    expectation (LayerNorm, then the 192 -> 27 projection: 192 weights of variance
    1 / (3 x 192)), so Eq. 1 starts near (1 + alpha)(1/3 + mean target^2): Figure 3's
    starting point (mae_loss). One initialization varies by about 15%; 8 are averaged."""
    smooth = F.interpolate(
        torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(0)),
        size=32,
        mode="bilinear",
    )  # image-like: neighbours correlated
    images = M.normalize(M.resize_test((127.5 + 60 * smooth).clamp(0, 255).round()))
    target_ms = (M.patchify(images) ** 2).mean().item()
    losses = []
    for seed in range(8):
        torch.manual_seed(seed)
        with torch.no_grad():
            losses.append(M.MAE().eval()(images)[0])
    assert torch.stack(losses).mean().item() == pytest.approx(1.1 * (1 / 3 + target_ms), rel=0.1)


def test_residual_stream_is_bf16_under_autocast_and_the_loss_stays_close():
    """Under bf16 autocast every block of both stacks receives (and so adds to) a bf16
    residual stream; in fp32 it stays fp32. The loss moves by bf16 rounding only."""
    torch.manual_seed(0)
    mae = M.MAE().eval()
    images, noise = torch.rand(4, 3, 36, 36) * 2 - 1, torch.rand(4, 144)
    seen = []
    for block in [*mae.encoder.blocks, *mae.decoder.blocks]:
        block.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    exact = mae(images, noise)[0]
    assert seen == [torch.float32] * 16
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = mae(images, noise)[0]
    assert seen == [torch.bfloat16] * 16
    assert abs(fast.item() - exact.item()) / exact.item() < 2e-2


# ---------------------------------------------------------------- recipes and schedules (Tables 1-2, Eq. 2)
def test_default_recipe_is_tables_1_and_2():
    """What a run gets when the command line gives only the stage and dataset."""
    table = dict(
        pretrain=dict(
            epochs=4000,
            warmup_epochs=400,
            batch_size=1408,
            base_lr=1.5e-4,
            weight_decay=0.05,
            mask_ratio=0.75,
            alpha=0.1,
            layer_decay=1.0,
        ),
        finetune=dict(
            epochs=300,
            warmup_epochs=20,
            batch_size=768,
            base_lr=1e-3,
            weight_decay=0.05,
            layer_decay=0.75,
        ),
    )
    for stage, expected in table.items():
        args = M.parse_args(cli("--stage", stage, "--dataset cifar10 --device cpu"))
        M.check_args(args)
        assert {k: getattr(args, k) for k in expected} == expected, stage
        assert args.min_lr == 0.0 and args.seed == 0 and not args.compile and args.amp == "off"
        assert args.norm_first is True  # pre-norm: see NORM_FIRST
        assert args.save_every == 20 and args.data_dir == "./data"
        assert (
            args.crop_scale == {"pretrain": (0.6, 1.0), "finetune": (0.8, 1.0)}[stage]
        )  # Tables 1-2
    assert M.PRETRAIN["crop_scale"] == (0.6, 1.0) and M.FINETUNE["crop_scale"] == (0.8, 1.0)


def test_learning_rate_schedule():
    peak = M.peak_lr(1.5e-4, 1408)
    assert peak == pytest.approx(8.25e-4)  # Eq. 2
    assert M.peak_lr(1e-3, 768) == pytest.approx(3e-3)
    lr = lambda s, floor=0.0: M.learning_rate(s, peak, 400, 4000, floor)
    assert lr(0) == 0.0
    assert lr(200) == pytest.approx(peak / 2)
    assert lr(400) == pytest.approx(peak)  # end of warm-up
    assert lr(2200) == pytest.approx(peak / 2)  # cosine midpoint
    assert lr(4000) == pytest.approx(0.0, abs=1e-12)  # end
    assert lr(4000, 0.2 * peak) == pytest.approx(0.2 * peak)  # §5 floor
    assert lr(2200, 0.2 * peak) == pytest.approx(0.6 * peak)
    values = [lr(s) for s in range(400, 4001, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_layer_decay_scales_and_weight_decay_groups():
    clf = M.Classifier(10)
    groups = M.param_groups(clf, 0.05, 0.75)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert scale[id(clf.encoder.patch_embed.weight)] == pytest.approx(0.75**13)
    assert scale[id(clf.encoder.pos_embed)] == pytest.approx(0.75**13)
    for i, block in enumerate(clf.encoder.blocks):
        assert scale[id(block.fc1.weight)] == pytest.approx(0.75 ** (12 - i))
    for p in [clf.head.weight, clf.head.bias, clf.encoder.proj.weight, clf.encoder.norm.weight]:
        assert scale[id(p)] == 1.0
    assert wd[id(clf.head.weight)] == 0.05 and wd[id(clf.encoder.blocks[3].qkv.weight)] == 0.05
    for p in [
        clf.head.bias,
        clf.encoder.pos_embed,
        clf.encoder.norm.weight,
        clf.encoder.blocks[0].fc1.bias,
    ]:
        assert wd[id(p)] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(clf.parameters()))
    assert {g["lr_scale"] for g in M.param_groups(M.MAE(), 0.05, 1.0)} == {1.0}


# ---------------------------------------------------------------- augmentation (Tables 1-2), on the device
def test_crop_boxes_match_torchvision_distribution():
    torch.manual_seed(0)
    n = 4000
    top, left, h, w, flip = M.crop_boxes(n, 32, 32, (0.6, 1.0))
    ref = torch.tensor(
        [
            T.RandomResizedCrop.get_params(torch.zeros(3, 32, 32), [0.6, 1.0], [3 / 4, 4 / 3])
            for _ in range(n)
        ],
        dtype=torch.float,
    )
    ours = torch.stack([top, left, h, w], 1)
    assert (h <= 32).all() and (w <= 32).all() and (top + h <= 32).all() and (left + w <= 32).all()
    assert torch.equal(h, h.round()) and torch.equal(top, top.round())
    for col in range(4):  # means and spreads agree within sampling error
        a, b = ours[:, col], ref[:, col]
        se = math.sqrt(a.var() / n + b.var() / n)
        assert abs(a.mean() - b.mean()) < 4 * se + 1e-6, col
        assert abs(a.std() - b.std()) < 0.1 * b.std() + 0.05, col
    area_ours, area_ref = (ours[:, 2] * ours[:, 3]) / 1024, (ref[:, 2] * ref[:, 3]) / 1024
    for q in (0.1, 0.5, 0.9):
        assert abs(area_ours.quantile(q) - area_ref.quantile(q)) < 0.03
    assert abs(flip.float().mean() - 0.5) < 0.04


def test_crop_resize_matches_torchvision_resized_crop_and_flip():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    boxes = [
        (0, 0, 32, 32, False),
        (3, 5, 20, 27, True),
        (10, 0, 22, 19, False),
        (0, 7, 25, 25, True),
        (31 - 26, 31 - 29, 27, 30, False),
        (2, 2, 28, 24, True),
    ]
    top, left, h, w, flip = (
        torch.tensor([b[i] for b in boxes], dtype=torch.float) for i in range(5)
    )
    out = M.crop_resize(images, top, left, h, w, flip.bool())
    for i, (t, l, hh, ww, f) in enumerate(boxes):
        ref = TF.resized_crop(images[i].float(), t, l, hh, ww, [36, 36], antialias=False)
        ref = TF.hflip(ref) if f else ref
        assert torch.allclose(out[i], ref, atol=1e-3), i


def test_crop_flip_normalize_output():
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    x = M.crop_flip_normalize(images, (0.6, 1.0))
    assert x.shape == (8, 3, 36, 36) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1


def test_autoaugmented_images_are_a_function_of_the_seed():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    ds = M.AutoAugmented(images, torch.arange(4))
    a, la = ds[(2, 123)]
    torch.manual_seed(999)
    before = torch.get_rng_state()
    b, lb = ds[(2, 123)]
    assert torch.equal(before, torch.get_rng_state())  # caller's RNG untouched
    assert a.shape == (3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, b) and la == lb == 2
    assert not all(torch.equal(a, ds[(2, s)][0]) for s in range(124, 130))
    # Table 2: exactly torchvision's AutoAugment with the CIFAR-10 policy, seeded per image
    policy = T2.AutoAugment(T2.AutoAugmentPolicy.CIFAR10)
    for seed in range(20):
        torch.manual_seed(seed)
        expected = TF.pil_to_tensor(policy(TF.to_pil_image(images[1])))
        assert torch.equal(ds[(1, seed)][0], expected), seed


def test_run_batches_span_every_epoch_and_resume_where_they_stopped():
    batches = list(M.run_batches(10, 3, seed=1, epochs=3))
    assert len(batches) == 3 * 3 and all(len(b) == 3 for b in batches)  # 10 // 3 per epoch
    for epoch in range(3):  # each epoch: its own order, last partial batch dropped
        order = M.epoch_order(10, 1, epoch).tolist()
        assert [i for b in batches[3 * epoch : 3 * epoch + 3] for i, _ in b] == order[:9]
    seeds = [s for b in batches for _, s in b]
    assert len(set(seeds)) == len(seeds)  # no image draw repeats another's augmentation
    assert list(M.run_batches(10, 3, 1, 3, first_epoch=1)) == batches[3:]  # resumed at epoch 1
    dataset = M.AutoAugmented(torch.zeros(10, 3, 32, 32, dtype=torch.uint8), torch.arange(10))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=M.run_batches(10, 3, 1, 3))
    assert [y.tolist() for _, y in loader] == [[i for i, _ in b] for b in batches]
    last = list(M.run_batches(50_000, 768, seed=2**32 - 1, epochs=300, first_epoch=299))[-1][
        -1
    ]  # the largest --seed
    assert 0 <= last[1] < 2**63
    M.AutoAugmented(
        torch.zeros(1, 3, 32, 32, dtype=torch.uint8).expand(50_000, -1, -1, -1), torch.zeros(50_000)
    )[last]  # its seed is accepted


# ---------------------------------------------------------------- learning
def test_pretraining_and_classifier_fit_one_small_batch(tmp_path):
    torch.manual_seed(0)
    root = write_cifar(str(tmp_path / "smooth"), per_batch=2)
    images, _ = M.load_cifar("cifar10", root, "train")
    x = M.normalize(M.resize_test(images[:2]))  # two images, memorised
    mae = M.MAE()
    opt = torch.optim.AdamW(mae.parameters(), lr=1e-3)
    losses = []
    for _ in range(60):
        loss = mae(x)[0]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < np.mean(losses[:3]) / 8, (losses[:3], losses[-5:])
    root = write_cifar(str(tmp_path / "colours"), per_batch=10, colours=True)
    images, labels = M.load_cifar("cifar10", root, "train")
    pick = torch.stack(
        [(labels == c).nonzero()[0, 0] for c in (3, 1, 4, 7)]
    )  # one image of each of 4 classes
    x, y = M.normalize(M.resize_test(images[pick])), labels[pick]
    clf = M.Classifier(10)
    opt = torch.optim.AdamW(clf.parameters(), lr=3e-4)
    for _ in range(15):
        loss = F.cross_entropy(clf(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    clf.eval()
    assert (clf(x).argmax(1) == y).all()


# ---------------------------------------------------------------- compile: one graph per stage
def test_compiled_steps_do_not_recompile():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    mae = M.MAE()
    compiled = torch.compile(mae, backend="eager", dynamic=False)
    opt = torch.optim.AdamW(M.param_groups(mae, 0.05, 1.0), lr=0.0)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    for step in range(3):
        for g in opt.param_groups:
            g["lr"] = 1e-4 * (step + 1) * g["lr_scale"]
        compiled(M.crop_flip_normalize(images, (0.6, 1.0)))[0].backward()
        opt.step()
        opt.zero_grad()
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    # fine-tuning: one graph for the training step, one for evaluation, however many batches
    clf = M.Classifier(10)
    compiled = torch.compile(clf, backend="eager", dynamic=False)
    opt = M.make_optimizer(clf, 0.05, 0.75, torch.device("cpu"))
    args = SimpleNamespace(device="cpu", amp="off")
    y = torch.arange(8) % 10
    for step in range(2):
        loss, correct = M.train_step(
            opt,
            torch.amp.GradScaler("cpu", enabled=False),
            functools.partial(M.finetune_loss, compiled, (0.8, 1)),
            (images, y),
            1e-3 * step,
            args,
        )
        assert 0 <= int(correct) <= 8
    acc = [M.evaluate_classifier(compiled, images, y, args) for _ in range(2)]
    assert acc[0] == acc[1]
    assert counters["stats"]["unique_graphs"] == 1 + 2, dict(counters["stats"])
    assert not counters["graph_break"]


# ---------------------------------------------------------------- the command line, end to end
def test_pretrain_finetune_eval_end_to_end(tmp_path, capsys):
    """The first step through the real command line in a new interpreter; the rest in this process."""
    data = write_cifar(str(tmp_path / "data"), per_batch=4, test=8)  # 20 images: 2 steps of 8
    pre, ft = str(tmp_path / "pre"), str(tmp_path / "ft")
    r = run_cli("--stage pretrain --dataset cifar10 --data-dir", data, "--out", pre, *TINY)
    assert "parameters: 4,856,256" in r.stdout
    s = summary(r)
    assert s["stage"] == "pretrain" and s["epochs"] == 2 and math.isfinite(s["final_loss"])
    rows = metrics(pre)
    assert [row["epoch"] for row in rows] == [1, 2]
    assert rows[-1]["loss"] == pytest.approx(s["final_loss"])
    assert all(row["images_per_s"] > 0 for row in rows)
    assert (
        math.isfinite(rows[-1]["test_loss"]) and s["test_loss"] == rows[-1]["test_loss"]
    )  # at the end
    lines = (
        r.stdout.strip().splitlines()
    )  # parameters, steps, lr and the run's values, 2 epochs, JSON
    assert len(lines) == 5 and "ETA" in lines[3] and "ETA" not in lines[2]
    assert json.loads(lines[1].split("run: ", 1)[1])["batch_size"] == 8
    assert lines[1].startswith("2 steps per epoch, peak lr 4.69e-06 (Eq. 2)")  # 1.5e-4 x 8 / 256
    ckpt = torch.load(os.path.join(pre, "checkpoint.pth"), weights_only=True)
    assert ckpt["stage"] == "pretrain" and ckpt["epoch"] == 2 and "optimizer" in ckpt
    assert ckpt["args"]["batch_size"] == 8 and ckpt["args"]["base_lr"] == 1.5e-4  # Table 1
    from PIL import Image  # arrives with torchvision

    assert Image.open(os.path.join(pre, "reconstructions-epoch0002.png")).size == (
        6 * 38 + 2,
        4 * 38 + 2,
    )

    s, out = run_main(
        capsys,
        "--stage finetune --dataset cifar10 --data-dir",
        data,
        "--out",
        ft,
        "--init",
        os.path.join(pre, "checkpoint.pth"),
        *TINY[:-1],
        "1",
    )
    assert "parameters: 3,636,490" in out and f"init: the encoder pre-trained in {pre}" in out
    assert 0 <= s["test_accuracy"] <= 1 and s["out"] == ft
    assert metrics(ft)[-1]["test_accuracy"] == s["test_accuracy"]
    # §4.2: the best epoch too, read from the log, and said to be chosen on the test split
    best = max(metrics(ft), key=lambda row: row["test_accuracy"])
    assert (s["best_test_accuracy"], s["best_epoch"]) == (best["test_accuracy"], best["epoch"])
    assert (
        f"best test accuracy {best['test_accuracy']:.4f}, epoch {best['epoch']} (test split)" in out
    )
    ckpt = torch.load(os.path.join(ft, "checkpoint.pth"), weights_only=True)
    assert ckpt["args"]["layer_decay"] == 0.75 and ckpt["args"]["base_lr"] == 1e-3  # Table 2
    # the pre-trained encoder, not the decoder, started the classifier
    init = torch.load(os.path.join(pre, "checkpoint.pth"), weights_only=True)["model"]
    start = M.Classifier(10)
    start.load_state_dict(init, strict=False)
    assert torch.equal(start.encoder.pos_embed, init["encoder.pos_embed"])

    e, _ = run_main(
        capsys,
        "--stage eval --init",
        os.path.join(ft, "checkpoint.pth"),
        "--data-dir",
        data,
        "--out",
        str(tmp_path / "ev"),
    )
    assert e["test_accuracy"] == pytest.approx(s["test_accuracy"]) and e["dataset"] == "cifar10"
    assert e["test_loss"] == pytest.approx(metrics(ft)[-1]["test_loss"])


def test_finetuning_logs_train_accuracy_and_test_loss_each_epoch(data, tmp_path, capsys):
    """Figure 6: training and test accuracy and loss while fine-tuning. train_accuracy is counted on the
    augmented batches (so a multiple of 1 / images seen); test_loss is the test split's cross-entropy."""
    out = str(tmp_path / "ft")
    s, printed = run_main(
        capsys,
        "--stage finetune --dataset cifar10 --data-dir",
        data,
        "--out",
        out,
        "--epochs 2 --warmup-epochs 1 --batch-size 8 --num-workers 0",
    )
    assert "init: none, so the encoder trains from scratch" in printed
    rows = metrics(out)
    seen = 3 * 8  # 30 images: 3 steps of 8
    for row in rows:
        assert (
            0 <= row["train_accuracy"] <= 1 and round(row["train_accuracy"] * seen, 6).is_integer()
        )
        assert math.isfinite(row["test_loss"]) and 0 <= row["test_accuracy"] <= 1
    epoch_lines = [line for line in printed.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 2 and all(
        "train_accuracy" in line and "test_loss" in line for line in epoch_lines
    )
    # the last row's test metrics are those of the saved weights
    model = M.Classifier(10)
    model.load_state_dict(
        torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)["model"]
    )
    images, labels = M.load_cifar("cifar10", data, "test")
    again = M.evaluate_classifier(model, images, labels, SimpleNamespace(device="cpu", amp="off"))
    assert again["test_loss"] == pytest.approx(rows[-1]["test_loss"], rel=1e-5)
    assert again["test_accuracy"] == rows[-1]["test_accuracy"]
    # and train_accuracy counts the step's own predictions: a model that is always right scores 1
    always = functools.partial(
        M.finetune_loss, lambda x: F.one_hot(y, 10).float() * 100, (0.8, 1.0)
    )
    y = torch.arange(4)
    _, correct = always((torch.zeros(4, 3, 32, 32, dtype=torch.uint8), y))
    assert int(correct) == 4


def test_cross_dataset_pretraining(tmp_path, capsys):
    """Table 3's other rows: pre-trained on CIFAR-10, fine-tuned on CIFAR-100."""
    root = write_cifar(str(tmp_path / "data"), per_batch=4, test=8)  # 20 images
    write_cifar(root, "cifar100", per_batch=2, test=8)  # 10 images
    pre = str(tmp_path / "pre")
    s, _ = run_main(
        capsys,
        "--stage pretrain --dataset cifar10 --data-dir",
        root,
        "--out",
        pre,
        "--epochs 1 --batch-size 20",
    )
    assert s["dataset"] == "cifar10"
    _, out = run_main(
        capsys,
        "--stage finetune --dataset cifar100 --data-dir",
        root,
        "--out",
        str(tmp_path / "ft"),
        "--init",
        os.path.join(pre, "checkpoint.pth"),
        "--epochs 1 --batch-size 10 --num-workers 0",
    )
    assert "parameters: 3,653,860" in out


def test_eta_leaves_out_the_first_epoch_which_compiles(tmp_path, monkeypatch, capsys):
    """On a GPU the first epoch compiles (minutes) and each later one takes about a second:
    an average over all epochs would overstate the time left for hundreds of epochs. Here
    a fake clock makes the first epoch one hour long."""
    root, hour = write_cifar(str(tmp_path / "data"), per_batch=2, test=8), [0.0]
    real_step = M.train_step

    def first_step_takes_an_hour(*args):
        hour[0] = 3600.0
        return real_step(*args)

    monkeypatch.setattr(M, "train_step", first_step_takes_an_hour)
    monkeypatch.setattr(M, "time", SimpleNamespace(time=lambda: time.time() + hour[0]))
    _, out = run_main(
        capsys,
        "--stage pretrain --dataset cifar10 --data-dir",
        root,
        "--out",
        str(tmp_path / "run"),
        "--epochs 3 --warmup-epochs 1 --batch-size 10",
    )
    lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert "ETA" not in lines[0]  # no ETA from the epoch that compiles
    h, m, sec = map(int, lines[1].rsplit("ETA ", 1)[1].split(":"))
    assert h * 3600 + m * 60 + sec < 60 and lines[2].endswith("ETA 0:00:00"), (
        lines
    )  # with epoch 1: 0:30:00


def test_missing_data_is_one_line_and_exit_2(tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        M.main(
            cli(
                "--stage pretrain --dataset cifar100 --data-dir",
                str(tmp_path / "none"),
                "--out",
                str(out),
            )
        )
        == 2
    )
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cifar-100-python is missing or corrupt" in err
    assert not out.exists()


def test_corrupt_data_is_one_line_and_exit_2(tmp_path, capsys):
    """torchvision's md5 check finds a truncated download, a batch whose labels were cut short
    or changed, an emptied test batch; offline, each ends in one line naming the folder."""
    out = tmp_path / "out"
    write_cifar(str(tmp_path))
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:1000])  # a truncated download
    assert (
        M.main(
            cli("--stage pretrain --dataset cifar10 --data-dir", str(tmp_path), "--out", str(out))
        )
        == 2
    )
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cifar-10-batches-py is missing or corrupt" in err
    assert "download failed (URLError)" in err and not out.exists()
    for bad_labels in ([1] * 19, [1] * 19 + [10]):  # one label short; a class CIFAR-10 lacks
        write_cifar(str(tmp_path))
        batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
        d = pickle.loads(batch.read_bytes())
        d["labels"] = bad_labels
        batch.write_bytes(pickle.dumps(d))
        assert (
            M.main(
                cli(
                    "--stage finetune --dataset cifar10 --data-dir",
                    str(tmp_path),
                    "--out",
                    str(out),
                )
            )
            == 2
        )
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "missing or corrupt" in err
        assert not out.exists()
    write_cifar(str(tmp_path))  # an empty test batch: found before any training
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(
        pickle.dumps(dict(data=np.zeros((0, 3072), np.uint8), labels=[]))
    )
    assert (
        M.main(
            cli(
                "--stage finetune --dataset cifar10 --data-dir",
                str(tmp_path),
                "--out",
                str(out),
                "--batch-size 32 --num-workers 0",
            )
        )
        == 2
    )
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "missing or corrupt" in err
    assert not out.exists()


BENCH_KEYS = {
    "device",
    "torch",
    "compile",
    "amp",
    "parameters",
    "macs_per_image",
    "pretrain_img_per_s",
    "finetune_img_per_s",
    "compiled_graphs",
    "knn_seconds_per_checkpoint",
    "projected_recipe_hours",
}


def test_bench_reports_true_macs(capsys):
    s, _ = run_main(capsys, "--stage bench --device cpu --batch-size 2 --num-workers 0 --amp off")
    assert BENCH_KEYS <= set(s)
    assert s["macs_per_image"] / 1e9 == pytest.approx(0.616, abs=0.005)  # true MACs, not 0.26
    assert s["parameters"] == 3_636_490 and s["compiled_graphs"] == 0  # not compiled on the CPU
    for key in ("pretrain_img_per_s", "finetune_img_per_s", "knn_seconds_per_checkpoint"):
        assert s[key] > 0
    hours = 4000 * 50_000 / s["pretrain_img_per_s"] + 300 * 50_000 / s["finetune_img_per_s"]
    assert s["projected_recipe_hours"] == pytest.approx(hours / 3600)
    assert s["torch"] == torch.__version__ and s["device"] == "cpu" and s["amp"] == "off"


# ---------------------------------------------------------------- long runs: resume, Ctrl-C, guards
def interrupted_here(args, monkeypatch, capsys, at_step):
    """Ctrl-C during training step `at_step`, in this process: main's one line and exit code."""
    real_step, steps = M.train_step, [0]

    def step_then_ctrl_c(*a):
        steps[0] += 1
        if steps[0] == at_step:
            raise KeyboardInterrupt
        return real_step(*a)

    monkeypatch.setattr(M, "train_step", step_then_ctrl_c)
    code = M.main(args)
    monkeypatch.setattr(M, "train_step", real_step)
    return code, capsys.readouterr()


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_a_run_stopped_after_a_checkpoint_and_resumed_equals_an_unbroken_one(
    stage, tmp_path, monkeypatch, capsys
):
    """Ctrl-C in epoch 3, after the checkpoint of epoch 2: one line, exit 130; --resume redoes epoch 3 from
    that checkpoint (weights, AdamW, RNG, log) and ends exactly where a run never stopped ends (CPU)."""
    data = write_cifar(str(tmp_path / "data"), per_batch=3, test=12)  # 15 images: 3 steps of 4
    common = cli(
        "--stage",
        stage,
        "--dataset cifar10 --data-dir",
        data,
        "--epochs 3 --warmup-epochs 1 --batch-size 4 --seed 3 --save-every 2",
    )
    if stage == "finetune":
        common += ["--num-workers", "1"]  # AutoAugment in a DataLoader worker
    straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
    expected, _ = run_main(capsys, *common, "--out", straight)
    code, printed = interrupted_here(
        [*common, "--out", broken], monkeypatch, capsys, at_step=2 * 3 + 2
    )
    assert code == 130 and printed.err.count("\n") == 1 and "Traceback" not in printed.err
    assert f"--stage {stage} --out {broken} --resume" in printed.err
    ckpt = torch.load(os.path.join(broken, "checkpoint.pth"), weights_only=True)
    assert ckpt["epoch"] == 2 and [r["epoch"] for r in metrics(broken)] == [1, 2]
    resumed, _ = run_main(
        capsys, "--stage", stage, "--out", broken, "--resume"
    )  # args from the checkpoint
    assert resumed["final_loss"] == expected["final_loss"]
    assert resumed.get("test_accuracy") == expected.get("test_accuracy")
    assert resumed.get("knn_accuracy") == expected.get("knn_accuracy")
    a = torch.load(os.path.join(straight, "checkpoint.pth"), weights_only=True)
    b = torch.load(os.path.join(broken, "checkpoint.pth"), weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    drop_timing = [{k: v for k, v in r.items() if k != "images_per_s"} for r in metrics(straight)]
    assert drop_timing == [
        {k: v for k, v in r.items() if k != "images_per_s"} for r in metrics(broken)
    ]


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_an_fp16_run_resumed_equals_an_unbroken_one_loss_scaler_included(
    stage, tmp_path, monkeypatch, capsys
):
    """--amp fp16 on the CPU (slow there: a few small steps). The loss scaler's state is in the
    checkpoint, so a run stopped after the checkpoint of epoch 1 and resumed ends with the weights
    and the scaler of an unbroken run. Here the scale doubles after every step without overflow
    (PyTorch's default waits 2000), so a resume with a fresh scaler would end elsewhere."""
    growing = functools.partial(torch.amp.GradScaler, growth_interval=1)
    monkeypatch.setattr(torch.amp, "GradScaler", growing)
    data = write_cifar(str(tmp_path / "data"), per_batch=1, test=3)  # 5 images: 1 step of 3
    common = cli(
        "--stage",
        stage,
        "--dataset cifar10 --data-dir",
        data,
        "--epochs 2 --warmup-epochs 1 --batch-size 3 --save-every 1 --num-workers 0 --amp fp16",
    )
    straight = str(tmp_path / "straight")
    broken = str(tmp_path / "broken")
    expected, out = run_main(capsys, *common, "--out", straight)
    assert '"amp": "fp16"' in out
    code, _ = interrupted_here([*common, "--out", broken], monkeypatch, capsys, at_step=2)
    assert code == 130
    first = torch.load(os.path.join(broken, "checkpoint.pth"), weights_only=True)
    resumed, out = run_main(capsys, "--stage", stage, "--out", broken, "--resume")
    assert '"amp": "fp16"' in out  # the run's, though the CPU's default is "off"
    a = torch.load(os.path.join(straight, "checkpoint.pth"), weights_only=True)
    b = torch.load(os.path.join(broken, "checkpoint.pth"), weights_only=True)
    assert first["epoch"] == 1 and a["epoch"] == b["epoch"] == 2
    assert first["scaler"]["scale"] != a["scaler"]["scale"]  # the second step moved it
    assert a["scaler"] == b["scaler"]
    assert resumed["final_loss"] == expected["final_loss"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_fp16_steps_scale_the_loss_and_skip_an_overflow():
    """Under --amp fp16 a training step goes through torch.amp.GradScaler, for both stages' losses.
    A step whose scaled gradients overflow fp16 is skipped (weights and AdamW untouched) and the
    scale lowered; the next, at the lower scale, is applied; weights and the loss stay fp32."""
    torch.manual_seed(0)
    args = SimpleNamespace(device="cpu", amp="fp16")
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)  # one: fp16 is slow here
    labels = torch.tensor([3])
    mae = M.MAE()
    classifier = M.Classifier(10)
    cases = [
        (mae, functools.partial(M.pretrain_loss, mae, (0.6, 1.0)), images),
        (classifier, functools.partial(M.finetune_loss, classifier, (0.8, 1.0)), (images, labels)),
    ]
    for model, step_loss, batch in cases:
        opt = M.make_optimizer(model, 0.05, 1.0, torch.device("cpu"))
        # a scale of 2^100 overflows any fp16 gradient; the backoff then brings it to 2^10
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100, backoff_factor=2.0**-90)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        loss, _ = M.train_step(opt, scaler, step_loss, batch, 1e-3, args)
        assert loss.dtype == torch.float32 and math.isfinite(loss.item())  # unscaled
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert not opt.state and scaler.get_scale() == 2.0**10  # AdamW never stepped
        M.train_step(opt, scaler, step_loss, batch, 1e-3, args)
        moved = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
        assert len(moved) > len(before) / 2 and opt.state
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert scaler.get_scale() == 2.0**10  # it grows only after 2000 steps without overflow


def test_ctrl_c_from_the_terminal_is_one_line_and_exit_130(data, tmp_path):
    """A real SIGINT to the whole process group, as a terminal's Ctrl-C sends it, DataLoader workers
    included, once the first checkpoint is written: one line, exit 130, and the run resumes."""
    out = str(tmp_path / "run")
    proc = subprocess.Popen(
        [
            sys.executable,
            *LAUNCH,
            "--stage",
            "finetune",
            "--dataset",
            "cifar10",
            "--data-dir",
            data,
            "--out",
            out,
            "--epochs",
            "50",
            "--batch-size",
            "4",
            "--num-workers",
            "1",
            "--save-every",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    checkpoint, deadline = os.path.join(out, "checkpoint.pth"), time.time() + 120
    while time.time() < deadline and proc.poll() is None and not os.path.exists(checkpoint):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    assert stderr.count("\n") == 1 and stderr.startswith("interrupted;") and "--resume" in stderr
    done = torch.load(checkpoint, weights_only=True)["epoch"]
    assert 1 <= done < 50
    r = run_cli("--stage finetune --out", out, "--resume --epochs", str(done + 1))
    assert summary(r)["epoch"] == done + 1


def test_resume_extends_epochs_and_refuses_other_changes(data, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert (
        M.main(
            cli(
                "--stage pretrain --dataset cifar10 --data-dir",
                data,
                "--out",
                out,
                "--epochs 1 --batch-size 10",
            )
        )
        == 0
    )
    before = open(os.path.join(out, "checkpoint.pth"), "rb").read()
    printed = capsys.readouterr()
    assert "3 steps per epoch, peak lr 5.86e-06 (Eq. 2)" in printed.out  # 1.5e-4 x 10 / 256
    assert M.main(cli("--stage pretrain --out", out, "--resume --base-lr 1e-3")) == 2
    err = capsys.readouterr().err
    assert "--base-lr 0.001 conflicts" in err and len(err.strip().splitlines()) == 1
    assert M.main(cli("--stage finetune --dataset cifar10 --out", out, "--resume")) == 2
    assert "is a pretrain checkpoint, not a finetune one" in capsys.readouterr().err
    assert M.main(cli("--stage eval --out", out, "--resume")) == 2
    assert open(os.path.join(out, "checkpoint.pth"), "rb").read() == before
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:  # epoch 2 logged, then killed unsaved
        f.write(json.dumps(dict(epoch=2, loss=-1.0)) + "\n" + '{"epoch": 3, "lo')
    assert M.main(cli("--stage pretrain --out", out, "--resume --epochs 2 --batch-size 10")) == 0
    printed = capsys.readouterr()
    run = json.loads(printed.out.splitlines()[1].split("run: ", 1)[1])
    assert (
        run["epochs"] == 2 and run["warmup_epochs"] == 400 and run["batch_size"] == 10
    )  # the run's own
    assert [r["epoch"] for r in metrics(out)] == [1, 2] and metrics(out)[1][
        "loss"
    ] > 0  # trained again
    assert torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)["epoch"] == 2
    finished = open(os.path.join(out, "checkpoint.pth"), "rb").read()
    assert M.main(cli("--stage pretrain --out", out, "--resume")) == 0  # nothing left to do
    capsys.readouterr()
    assert M.main(cli("--stage pretrain --out", out, "--resume --epochs 1")) == 2
    assert "--epochs 1: the run has done 2 already" in capsys.readouterr().err
    assert M.main(cli("--stage pretrain --out", out, "--resume --epochs 0")) == 2  # not "unset"
    assert open(os.path.join(out, "checkpoint.pth"), "rb").read() == finished
    assert [r["epoch"] for r in metrics(out)] == [1, 2]


def test_crop_scale_flag_is_used_saved_and_fixed_for_the_run(tmp_path, monkeypatch, capsys):
    """--crop-scale reaches the augmentation, and a run keeps it on --resume."""
    seen, real = [], M.crop_flip_normalize
    monkeypatch.setattr(
        M, "crop_flip_normalize", lambda images, scale: seen.append(scale) or real(images, scale)
    )
    out, data = (
        str(tmp_path / "run"),
        write_cifar(str(tmp_path / "data"), per_batch=5, test=8),
    )  # 25 images
    assert (
        M.main(
            cli(
                "--stage pretrain --dataset cifar10 --data-dir",
                data,
                "--out",
                out,
                "--epochs 1 --batch-size 8 --crop-scale 0.5 0.9",
            )
        )
        == 0
    )
    assert set(seen) == {(0.5, 0.9)} and len(seen) == 3  # 25 images: 3 steps of 8
    assert torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)["args"][
        "crop_scale"
    ] == (0.5, 0.9)
    capsys.readouterr()
    assert M.main(cli("--stage pretrain --out", out, "--resume --epochs 2 --crop-scale 0.6 1")) == 2
    assert "--crop-scale (0.6, 1.0) conflicts" in capsys.readouterr().err
    seen.clear()
    assert M.main(cli("--stage pretrain --out", out, "--resume --epochs 2")) == 0
    assert set(seen) == {(0.5, 0.9)}


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    calls, clean = [0], M.mae_loss

    def poisoned(*args):  # the 8th training loss (epoch 2, step 8) becomes NaN
        calls[0] += torch.is_grad_enabled()  # (evaluation calls it too)
        loss = clean(*args)
        return loss * float("nan") if calls[0] == 8 else loss

    monkeypatch.setattr(M, "mae_loss", poisoned)
    with pytest.raises(SystemExit) as stop:
        M.main(
            cli(
                "--stage pretrain --dataset cifar10 --data-dir",
                data,
                "--out",
                out,
                "--epochs 3 --batch-size 5 --save-every 1",
            )
        )
    message = str(stop.value.code)  # a message, so the exit code is 1
    assert "non-finite loss in epoch 2" in message
    ckpt = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not os.path.exists(os.path.join(out, "checkpoint.pth.tmp"))


def test_diverging_run_exits_1_with_one_line(tmp_path):
    out, data = (
        tmp_path / "run",
        write_cifar(str(tmp_path / "data"), per_batch=4, test=8),
    )  # 20 images
    with pytest.raises(SystemExit) as stop:
        M.main(
            cli(
                "--stage pretrain --dataset cifar10 --data-dir",
                data,
                "--out",
                str(out),
                "--epochs 2 --batch-size 10 --warmup-epochs 0 --base-lr 1e30",
            )
        )
    message = str(stop.value.code)  # a message, so Python prints it as one line and exits with 1
    assert message.startswith("error: non-finite loss in epoch 1;") and "\n" not in message
    assert not (out / "checkpoint.pth").exists()


def test_a_failed_write_stops_with_one_line_and_keeps_what_was_written(data, tmp_path, monkeypatch):
    """A full disk: the second checkpoint's write fails. The run stops with one line and exit 1, and
    leaves the checkpoint written before whole, with no half-written file beside it."""
    out = tmp_path / "run"
    real_write = M.write_file
    checkpoints = [0]

    def second_checkpoint_fails(path, data):
        if path.endswith("checkpoint.pth"):
            checkpoints[0] += 1
        if checkpoints[0] == 2:
            with open(path + ".tmp", "wb") as f:
                f.write(data[: len(data) // 2])  # half of it written, then the disk is full
            monkeypatch.setattr(os, "replace", no_space)
        return real_write(path, data)

    def no_space(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(M, "write_file", second_checkpoint_fails)
    with pytest.raises(SystemExit) as stop:
        M.main(
            cli(
                "--stage pretrain --dataset cifar10 --data-dir",
                data,
                "--out",
                str(out),
                "--epochs 2 --batch-size 10 --save-every 1",
            )
        )
    message = str(stop.value.code)  # a message, so the exit code is 1
    assert message == (
        f"error: could not write {out / 'checkpoint.pth'} (No space left on device); "
        "earlier files are kept"
    )
    monkeypatch.undo()
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 1
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    assert (
        M.main(cli("--stage pretrain --out", str(out), "--resume")) == 0
    )  # it goes on from epoch 1


def test_out_of_gpu_memory_is_one_line_and_exit_1(data, tmp_path, monkeypatch, capsys):
    def no_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert (
        M.main(
            cli(
                "--stage pretrain --dataset cifar10 --data-dir",
                data,
                "--out",
                str(tmp_path / "run"),
                "--batch-size 10 --epochs 1 --warmup-epochs 0",
            )
        )
        == 0
    )
    before = (tmp_path / "run" / "checkpoint.pth").read_bytes()
    capsys.readouterr()
    monkeypatch.setattr(M, "train_step", no_memory)
    assert M.main(cli("--stage pretrain --out", str(tmp_path / "run"), "--resume --epochs 2")) == 1
    err = capsys.readouterr().err
    assert err == "error: out of memory (--batch-size 10); try less\n"
    assert (tmp_path / "run" / "checkpoint.pth").read_bytes() == before


class RunsCode:
    """A pickle that would run a shell command when loaded without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def checkpoints(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    pre, ft = str(root / "pre"), str(root / "ft")
    base = cli("--dataset cifar10 --data-dir", data, "--epochs 1 --batch-size 10 --num-workers 0")
    assert M.main(cli("--stage pretrain --out", pre, *base)) == 0
    assert M.main(cli("--stage finetune --out", ft, *base)) == 0
    pre, ft = os.path.join(pre, "checkpoint.pth"), os.path.join(ft, "checkpoint.pth")
    text = str(root / "notes.txt")
    open(text, "w").write("not a checkpoint")
    evil, marker = str(root / "evil.pth"), str(root / "pwned")
    torch.save({"stage": "finetune", "model": RunsCode(marker), "args": {}}, evil)
    other = str(root / "other.pth")
    state = torch.load(pre, weights_only=True)
    state["model"]["encoder.pos_embed"] = torch.zeros(65, 192)  # a 32x32 / 4x4 model
    torch.save(state, other)
    broken = root / "broken"  # a run folder whose checkpoint was swapped
    broken.mkdir()
    torch.save(state, broken / "checkpoint.pth")
    headless = str(root / "headless.pth")  # a classifier that lost its head
    state = torch.load(ft, weights_only=True)
    del state["model"]["head.weight"]
    torch.save(state, headless)
    forged = str(root / "forged.pth")  # the top-level keys, none of the contents
    torch.save({"stage": "finetune", "model": {}, "args": {}}, forged)
    logonly = root / "logonly"  # a run killed before its first checkpoint
    logonly.mkdir()
    (logonly / "metrics.jsonl").write_text(open(os.path.join(root, "pre", "metrics.jsonl")).read())
    return dict(
        pre=pre,
        ft=ft,
        text=text,
        evil=evil,
        marker=marker,
        other=other,
        used=str(root),
        broken=str(broken),
        headless=headless,
        forged=forged,
        logonly=str(logonly),
    )


# case: (what follows --stage, part of the one-line error it must give). The part names
# the check, so that a case stopped by some other check fails.
BAD = {
    "unknown stage": ("train --dataset cifar10", "invalid choice: 'train'"),
    "unknown dataset": ("pretrain --dataset imagenet", "invalid choice: 'imagenet'"),
    "missing init": ("finetune --dataset cifar10 --init {root}/nothing.pth", "does not exist"),
    "init is a folder": ("finetune --dataset cifar10 --init {used}", "is a folder"),
    "init not a checkpoint": ("finetune --dataset cifar10 --init {text}", "is not a checkpoint"),
    "init runs code": ("eval --init {evil}", "is not a checkpoint"),
    "finetune from finetuned": (
        "finetune --dataset cifar100 --init {ft}",
        "is a finetune checkpoint",
    ),
    "eval of a pretrain checkpoint": (
        "eval --init {pre}",
        "is a pretrain checkpoint, not a finetune one",
    ),
    "eval with wrong classes": (
        "eval --dataset cifar100 --init {ft}",
        "classifies cifar10, not cifar100",
    ),
    "other architecture": (
        "finetune --dataset cifar10 --init {other}",
        "does not match this architecture (size "
        "mismatch for encoder.pos_embed: copying a param with shape torch.Size([65, 192])",
    ),
    "eval of a headless classifier": (
        "eval --init {headless}",
        'does not match this architecture (Missing key(s) in state_dict: "head.weight"',
    ),
    "resume a swapped checkpoint": (
        "pretrain --out {broken} --resume",
        "does not match this architecture",
    ),
    "init of a forged checkpoint": (
        "eval --init {forged}",
        "forged.pth is not a mae_vit checkpoint",
    ),
    "mask ratio above 1": (
        "pretrain --dataset cifar10 --mask-ratio 1.5",
        "--mask-ratio 1.5 must be",
    ),
    "mask ratio 0": ("pretrain --dataset cifar10 --mask-ratio 0", "--mask-ratio 0.0 must be"),
    "no visible patch": (
        "pretrain --dataset cifar10 --mask-ratio 0.999",
        "--mask-ratio 0.999 must be",
    ),
    "batch size 0": (
        "pretrain --dataset cifar10 --batch-size 0",
        "--batch-size must be a positive number",
    ),
    "batch above data": (
        "pretrain --dataset cifar10 --batch-size 1000",
        "is larger than the training set",
    ),
    "negative epochs": (
        "finetune --dataset cifar10 --epochs -1",
        "--epochs must be a positive number",
    ),
    "zero lr": ("pretrain --dataset cifar10 --base-lr 0", "--base-lr must be a positive number"),
    "save every 0 epochs": (
        "pretrain --dataset cifar10 --save-every 0",
        "--save-every must be a positive",
    ),
    "negative warm-up": (
        "pretrain --dataset cifar10 --warmup-epochs -1",
        "--warmup-epochs must be a non-neg",
    ),
    "negative alpha": (
        "pretrain --dataset cifar10 --alpha -0.1",
        "--alpha must be a non-negative number",
    ),
    "negative weight decay": (
        "finetune --dataset cifar10 --weight-decay -1",
        "--weight-decay must be a non-neg",
    ),
    "negative workers": (
        "finetune --dataset cifar10 --num-workers -1",
        "--num-workers must be a non-neg",
    ),
    "crop scale reversed": (
        "pretrain --dataset cifar10 --crop-scale 0.9 0.5",
        "--crop-scale must be MIN MAX",
    ),
    "crop scale of one number": (
        "finetune --dataset cifar10 --crop-scale 0.8",
        "--crop-scale: expected 2 arguments",
    ),
    "crop scale not a number": (
        "finetune --dataset cifar10 --crop-scale 0.8 nan",
        "--crop-scale must be MIN MAX",
    ),
    "layer decay above 1": (
        "finetune --dataset cifar10 --layer-decay 1.5",
        "--layer-decay must be in (0, 1]",
    ),
    "lr not a number": (
        "pretrain --dataset cifar10 --base-lr nan",
        "--base-lr must be a positive number",
    ),
    "infinite lr": (
        "pretrain --dataset cifar10 --base-lr inf",
        "--base-lr must be a positive number",
    ),
    "infinite alpha": (
        "pretrain --dataset cifar10 --alpha inf",
        "--alpha must be a non-negative number",
    ),
    "lr not numeric": (
        "pretrain --dataset cifar10 --min-lr fast",
        "argument --min-lr: invalid float value",
    ),
    "out holds a run": (
        "pretrain --dataset cifar10 --out {used}/pre --batch-size 10",
        "has a run (checkpoint.pth); use another --out",
    ),
    "out holds a run killed before its first checkpoint": (
        "pretrain --dataset cifar10 --out {logonly} --batch-size 10",
        "has a run (metrics.jsonl)",
    ),
    "resume nothing": ("pretrain --dataset cifar10 --resume", "does not exist"),
    "resume without a run folder": (
        "finetune --dataset cifar10 --resume --out {root}/none",
        "does not exist",
    ),
    "resume eval": (
        "eval --init {ft} --resume",
        "--resume goes on with the pretrain or finetune run",
    ),
    "unknown device": ("pretrain --dataset cifar10 --device gpu", "is not a device name"),
    "device neither cpu nor cuda": (
        "pretrain --dataset cifar10 --device mps",
        "runs on cpu or cuda",
    ),
    "no such cuda device": ("pretrain --dataset cifar10 --device cuda:99", "CUDA device"),
    "out is a file": (
        "pretrain --dataset cifar10 --out {text} --batch-size 10",
        "is a file, not a folder",
    ),
    "seed out of range": ("finetune --dataset cifar10 --seed -1", "--seed must be in [0, 2^32)"),
    "pretrain given --init": (
        "pretrain --dataset cifar10 --init {pre}",
        "--init is for finetune and eval",
    ),
    "bench given --init": ("bench --init {ft}", "--init is for finetune and eval"),
    "min lr above the peak": (
        "pretrain --dataset cifar10 --min-lr 0.2",
        "is above Eq. 2's peak lr",
    ),
    "no dataset": ("finetune --epochs 1", "needs --dataset cifar10 or cifar100"),
    "eval without init": ("eval --dataset cifar10", "--stage eval needs --init"),
    "init of other layers": (
        "finetune --dataset cifar10 --init {pre} --no-norm-first",
        "pre/checkpoint.pth has norm_first=True; leave the flag out",
    ),
    "eval of other layers": ("eval --init {ft} --no-norm-first", "has norm_first=True"),
    "resume with other layers": (
        "pretrain --out {used}/pre --resume --no-norm-first",
        "--norm-first False conflicts with the run in",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, checkpoints, data, tmp_path, capsys):
    paths = dict(checkpoints, root=str(tmp_path), empty="")
    arguments, message = BAD[case]
    argv = ["--stage", *(a.format(**paths) for a in arguments.split())]  # paths may hold spaces
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    before = sorted(os.listdir(checkpoints["used"] + "/pre"))
    try:
        code = M.main([*argv, "--data-dir", data])
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert (
        len(err.strip().splitlines()) == 1 and err.startswith("error:") and "Traceback" not in err
    )
    assert message in err
    assert not (tmp_path / "out").exists()
    assert sorted(os.listdir(checkpoints["used"] + "/pre")) == before
    assert not os.path.exists(checkpoints["marker"])


def test_bad_input_from_the_shell_has_no_traceback(checkpoints, data, tmp_path):
    r = run_cli(
        "--stage finetune --dataset cifar10 --init",
        checkpoints["text"],
        "--data-dir",
        data,
        "--out",
        str(tmp_path / "out"),
        check=False,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "notes.txt is not a checkpoint" in r.stderr
    assert not (tmp_path / "out").exists()


def test_empty_paths_fall_back_to_the_defaults(checkpoints, data, tmp_path, monkeypatch, capsys):
    """--out "" or --init "" (a shell variable left unset) is as if the flag were not given: the default
    folder, no init (which the console says); nothing is written to the current folder itself."""
    monkeypatch.chdir(tmp_path)
    s, out = run_main(
        capsys,
        "--stage finetune --dataset cifar10 --data-dir",
        data,
        "--out",
        "",
        "--init",
        "",
        "--epochs 1 --batch-size 10 --num-workers 0",
    )
    assert s["out"] == os.path.join("runs", "finetune-cifar10") and "trains from scratch" in out
    assert sorted(os.listdir(tmp_path)) == ["runs"]


def test_pretraining_test_loss_is_eq1_on_the_test_split_masked_from_the_runs_seed(
    data, tmp_path, capsys
):
    """Each checkpoint logs Eq. 1 on the whole test split, every image masked by the run's own seed (the
    same masks at every checkpoint, and the first 8 are the picture's): recomputed here from the saved
    weights, it is the same number; another seed's masks give another."""
    out = str(tmp_path / "pre")
    s, _ = run_main(
        capsys,
        "--stage pretrain --dataset cifar10 --data-dir",
        data,
        "--out",
        out,
        "--epochs 1 --batch-size 10 --seed 5",
    )
    mae = M.MAE()
    mae.load_state_dict(torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)["model"])
    test_images, _ = M.load_cifar("cifar10", data, "test")
    args = SimpleNamespace(device="cpu", amp="off")

    def test_loss(seed):
        noise = torch.rand(len(test_images), 144, generator=torch.Generator().manual_seed(seed))
        return M.evaluate_mae(mae, test_images, noise, str(tmp_path / f"seed{seed}.png"), args)

    assert test_loss(5) == pytest.approx(s["test_loss"], rel=1e-6) == metrics(out)[0]["test_loss"]
    assert test_loss(6) != pytest.approx(s["test_loss"], rel=1e-6)
    picture = open(os.path.join(out, "reconstructions-epoch0001.png"), "rb").read()
    assert open(tmp_path / "seed5.png", "rb").read() == picture


def test_eval_default_out_and_no_overwrite(checkpoints, data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert M.main(cli("--stage eval --init", checkpoints["ft"], "--data-dir", data)) == 0
    assert len(metrics(str(tmp_path / "runs" / "eval-cifar10"))) == 1
    assert (
        M.main(cli("--stage eval --init", checkpoints["ft"], "--data-dir", data)) == 2
    )  # no overwrite
    assert "runs/eval-cifar10 has a run (metrics.jsonl)" in capsys.readouterr().err


def test_post_norm_comes_from_the_checkpoint_on_resume_finetune_and_eval(data, tmp_path, capsys):
    """--no-norm-first is part of the model: given once, to pre-training, it is saved, kept on
    --resume, and builds the fine-tuned and the evaluated classifier without being given again.
    Checkpoints from before the flag hold pre-norm layers."""
    pre = str(tmp_path / "pre")
    ft = str(tmp_path / "ft")
    base = cli("--dataset cifar10 --data-dir", data, "--batch-size 10 --num-workers 0")
    run_main(capsys, "--stage pretrain --out", pre, *base, "--epochs 1 --no-norm-first")
    _, out = run_main(capsys, "--stage pretrain --out", pre, "--resume --epochs 2")
    assert '"norm_first": false' in out
    init = os.path.join(pre, "checkpoint.pth")
    _, out = run_main(capsys, "--stage finetune --out", ft, "--init", init, *base, "--epochs 1")
    assert '"norm_first": false' in out
    tuned = os.path.join(ft, "checkpoint.pth")
    checkpoint = torch.load(tuned, weights_only=True)
    assert checkpoint["args"]["norm_first"] is False
    evaluated, _ = run_main(capsys, "--stage eval --out", str(tmp_path / "ev"), "--init", tuned)
    # The weights measured with each layer: eval's figure and fine-tuning's are post-norm's
    images, labels = M.load_cifar("cifar10", data, "test")
    args = SimpleNamespace(device="cpu", amp="off")
    losses = {}
    for norm_first in (True, False):
        model = M.Classifier(10, norm_first)
        model.load_state_dict(checkpoint["model"])
        losses[norm_first] = M.evaluate_classifier(model, images, labels, args)["test_loss"]
    assert evaluated["test_loss"] == pytest.approx(losses[False], rel=1e-5)
    assert metrics(ft)[-1]["test_loss"] == pytest.approx(losses[False], rel=1e-5)
    assert losses[True] != pytest.approx(losses[False], rel=1e-3)
    del checkpoint["args"]["norm_first"]  # as written before the flag
    checkpoint["args"]["amp"] = True  # and before --amp took a type
    old = str(tmp_path / "old.pth")
    torch.save(checkpoint, old)
    args = M.parse_args(cli("--stage eval --init", old))
    M.check_args(args)
    assert args.norm_first is True
    assert M.load_checkpoint(old, "finetune")["args"]["amp"] == "bf16"


def fake_gpu(monkeypatch, capability):
    """Makes check_args see one CUDA GPU of the given compute capability."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


def test_eval_does_not_compile_by_default_on_cuda(checkpoints, monkeypatch):
    """Eval passes over the test set once: compiling would cost more than it saves."""
    fake_gpu(monkeypatch, (9, 0))
    ev = M.parse_args(cli("--stage eval --init", checkpoints["ft"], "--device cuda"))
    M.check_args(ev)
    assert ev.compile is False and ev.amp == "bf16"
    ft = M.parse_args(cli("--stage finetune --dataset cifar10 --device cuda"))
    M.check_args(ft)
    assert ft.compile is True and ft.amp == "bf16"
    forced = M.parse_args(cli("--stage eval --init", checkpoints["ft"], "--device cuda --compile"))
    M.check_args(forced)
    assert forced.compile is True


@pytest.mark.parametrize(
    "capability, compile, amp",
    [
        ((9, 0), True, "bf16"),
        ((8, 0), True, "bf16"),
        ((7, 5), True, "fp16"),
        ((6, 0), False, "fp16"),
        ((6, 1), False, "off"),
    ],
)
def test_gpu_defaults_follow_compute_capability(monkeypatch, capability, compile, amp):
    """bf16 autocast by default from Ampere (8.0); fp16 with a loss scaler where fp16 is fast and
    bf16 is not (T4 7.5, V100 7.0, P100 6.0), fp32 where neither is (GTX 10xx, P40: 6.1); and
    torch.compile from Volta (7.0): a P100 runs eager instead of meeting a Triton error."""
    fake_gpu(monkeypatch, capability)
    args = M.parse_args(cli("--stage pretrain --dataset cifar10 --device cuda"))
    M.check_args(args)
    assert (args.compile, args.amp) == (compile, amp)
    for forced in ("bf16", "fp16", "off"):  # an explicit choice is obeyed
        args = M.parse_args(cli("--stage pretrain --dataset cifar10 --device cuda --amp", forced))
        M.check_args(args)
        assert args.amp == forced
    with pytest.raises(M.UsageError, match=r"has 1 CUDA device\(s\)"):
        M.check_args(M.parse_args(cli("--stage pretrain --dataset cifar10 --device cuda:1")))


def test_main_makes_the_chosen_gpu_the_current_one(monkeypatch, capsys):
    """Pinned-memory copies and compilation work on the current GPU: main sets it, as an index
    (torch.cuda.set_device refuses a "cuda" without one)."""
    fake_gpu(monkeypatch, (9, 0))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch, "set_float32_matmul_precision", print)  # leaves the CPU's alone
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", print)
    monkeypatch.setattr(M, "bench", lambda args: {})  # the stage itself is not run
    for device in ("cuda", "cuda:1"):
        assert M.main(cli("--stage bench --device", device)) == 0
    assert chosen == [0, 1]


def test_the_readme_python_example_runs(checkpoints, tmp_path, monkeypatch, capsys):
    """README.md's "Use it from Python" block, run as written, in a folder laid out as the README's commands leave it."""
    readme = open(os.path.join(HERE, "README.md")).read()
    code = readme.split("## Use it from Python", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    write_cifar("data")
    os.makedirs("runs/pretrain-cifar10")
    with (
        open(checkpoints["pre"], "rb") as src,
        open("runs/pretrain-cifar10/checkpoint.pth", "wb") as dst,
    ):
        dst.write(src.read())
    names = {}
    exec(compile(code, "README.md", "exec"), names)
    assert names["reconstruction"].shape == (8, 3, 36, 36) and names["features"].shape == (8, 192)
    assert names["mask"].sum(1).eq(108).all() and math.isfinite(names["loss"])
    assert "Eq. 1 loss" in capsys.readouterr().out


class GreyLookup(nn.Module):
    """An 'encoder' whose dummy-token output is a hand-made feature, looked up by the grey level of a constant image."""

    def __init__(self, table):
        super().__init__()
        self.table = table  # (256, D)

    def forward(self, patches):  # (B, 144, 27) of normalized constant images
        level = ((patches[:, 0, 0] * M.STD + M.MEAN) * 255).round().long()
        return self.table[level][:, None].expand(-1, 145, -1)


def grey(levels):
    return (
        torch.tensor(levels, dtype=torch.uint8)[:, None, None, None]
        .expand(-1, 3, 32, 32)
        .contiguous()
    )


def test_knn_accuracy_on_hand_made_features():
    labels = torch.arange(30) % 3  # 3 classes, 10 training images each
    table = torch.zeros(256, 3)
    table[:40] = F.one_hot(
        torch.arange(40) % 3, 3
    ).float()  # grey level g: the one-hot of class g % 3
    train, test = grey(range(30)), grey(range(30, 39))
    assert M.knn_accuracy(GreyLookup(table), train, labels, test, torch.arange(30, 39) % 3) == 1.0
    assert (
        M.knn_accuracy(GreyLookup(table), train, labels, test, torch.arange(30, 39) % 3, k=1000)
        == 1.0
    )  # k > N
    # each test image nearest to one training image of another class, far from all others: 0%
    angles = torch.linspace(0, 3, 30)  # 30 directions, 0.1 rad apart
    table[:30] = torch.stack([angles.cos(), angles.sin(), torch.zeros(30)], 1)
    near = torch.arange(9) * 3 + torch.arange(9) % 3  # training images of classes 0, 1, 2, 0, ...
    table[30:39] = table[near]  # test image j is training image near[j]
    assert (
        M.knn_accuracy(GreyLookup(table), train, labels, test, (labels[near] + 1) % 3, k=1) == 0.0
    )
    assert M.knn_accuracy(GreyLookup(table), train, labels, test, labels[near], k=1) == 1.0
    # a tie (one neighbour of class 0, one of class 1, equally similar) goes to the lower class, every time
    table[:] = 0
    table[:2, 0] = 1
    table[2:30, 1] = 1
    table[30:39, 0] = 1
    tie_labels = torch.tensor([1, 0] + [2] * 28)
    assert (
        M.knn_accuracy(
            GreyLookup(table), train, tie_labels, test, torch.zeros(9, dtype=torch.long), k=2
        )
        == 1.0
    )
    # k larger than a class: 2 images of class 0 at similarity 1 outvote 18 of class 2 at similarity 0
    small_class = torch.tensor([0, 0] + [2] * 28)
    assert (
        M.knn_accuracy(
            GreyLookup(table), train, small_class, test, torch.zeros(9, dtype=torch.long), k=20
        )
        == 1.0
    )


def test_pretraining_logs_knn_accuracy_and_reconstructions_at_checkpoints(tmp_path, capsys):
    from PIL import Image  # arrives with torchvision

    root = write_cifar(
        str(tmp_path / "data"), per_batch=10, test=20, colours=True
    )  # 10 separable classes
    out = str(tmp_path / "pre")
    s, printed = run_main(
        capsys,
        "--stage pretrain --dataset cifar10 --data-dir",
        root,
        "--out",
        out,
        "--epochs 3 --warmup-epochs 1 --batch-size 25 --save-every 2",
    )
    rows = metrics(out)
    assert ["knn_accuracy" in r for r in rows] == [
        False,
        True,
        True,
    ]  # at the checkpoints, epochs 2 and 3
    assert all(r["knn_accuracy"] > 0.5 for r in rows[1:])  # chance is 0.1
    assert s["knn_accuracy"] == rows[-1]["knn_accuracy"] and "knn_accuracy" in printed
    pictures = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    assert pictures == [
        "reconstructions-epoch0002.png",
        "reconstructions-epoch0003.png",
    ]  # Figure 5's evolution
    for name in pictures:
        assert Image.open(os.path.join(out, name)).size == (
            6 * 38 + 2,
            4 * 38 + 2,
        )  # 8 triplets, 2 a row


# ---------------------------------------------------------------- on a CUDA GPU: compiled bf16 and fp16 runs
# `python3 -m pytest -q -k cuda test_mae_vit.py` runs these, and the attention kernels' test above;
# without a GPU they are skipped. Each run compiles afresh: dynamo's caches are emptied first.
CUDA_RUN = cli("--device cuda --compile --batch-size 8 --warmup-epochs 1")


def compiled_run(capsys, *args):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    result, _ = run_main(capsys, *args, *CUDA_RUN)
    return (
        result,
        dict(torch._dynamo.utils.counters["stats"]),
        dict(torch._dynamo.utils.counters["graph_break"]),
    )


@cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_cuda_each_stage_compiles_one_training_graph_and_never_recompiles(
    stage, amp, tmp_path, capsys
):
    """Two epochs and two evaluations, compiled with autocast (and fp16's scaler): one graph for the training step and one
    for the evaluation pass (pre-training's k-NN encoder, fine-tuning's test split), each of one shape (the
    training and test sets both hold 20 images), and no graph break."""
    data = write_cifar(str(tmp_path / "data"), per_batch=4, test=20)  # 20 + 20 images
    args = cli(
        "--stage",
        stage,
        "--dataset cifar10 --data-dir",
        data,
        "--out",
        str(tmp_path / "run"),
        "--epochs 2 --save-every 1 --num-workers 0 --amp",
        amp,
    )
    result, stats, breaks = compiled_run(capsys, *args)
    assert stats["unique_graphs"] == 2, stats
    assert not breaks, breaks
    assert math.isfinite(result["final_loss"]) and [
        r["epoch"] for r in metrics(str(tmp_path / "run"))
    ] == [1, 2]


@cuda
@pytest.mark.parametrize("stage, amp", [("pretrain", "bf16"), ("finetune", "fp16")])
def test_cuda_compiled_run_stopped_and_resumed_matches_an_unbroken_one(
    stage, amp, tmp_path, monkeypatch, capsys
):
    """As on the CPU, with compiled bf16 or fp16 steps (fp16's scaler saved) and CUDA's RNG: a run
    stopped by Ctrl-C after the checkpoint of epoch 2 and resumed ends where an unbroken run ends.
    CUDA kernels need not be bit-reproducible (the backward of gather and of attention accumulate
    with atomics), so the resumed run may differ from the unbroken one by no more than two unbroken
    runs differ from each other (exactly, where they agree)."""
    data = write_cifar(str(tmp_path / "data"), per_batch=6, test=12)  # 30 images: 3 steps of 8
    common = cli(
        "--stage",
        stage,
        "--dataset cifar10 --data-dir",
        data,
        "--epochs 3 --seed 3 --save-every 2 --num-workers 1 --amp",
        amp,
    )
    runs = {}
    for name in ("straight", "again"):
        runs[name], _, _ = compiled_run(capsys, *common, "--out", str(tmp_path / name))
    torch._dynamo.reset()
    code, printed = interrupted_here(
        [*common, *CUDA_RUN, "--out", str(tmp_path / "broken")],
        monkeypatch,
        capsys,
        at_step=2 * 3 + 2,
    )
    assert code == 130, printed.err
    runs["resumed"], _, _ = compiled_run(
        capsys, "--stage", stage, "--out", str(tmp_path / "broken"), "--resume"
    )
    weights = {
        name: torch.load(tmp_path / folder / "checkpoint.pth", weights_only=True)["model"]
        for name, folder in (("straight", "straight"), ("again", "again"), ("resumed", "broken"))
    }

    def distance(a, b):
        loss = abs(runs[a]["final_loss"] - runs[b]["final_loss"])
        weight = max(
            (weights[a][k].float() - weights[b][k].float()).abs().max().item() for k in weights[a]
        )
        return loss, weight

    noise = distance("straight", "again")
    resumed = distance("straight", "resumed")
    print(f"unbroken vs unbroken: {noise}; unbroken vs resumed: {resumed}")
    assert resumed[0] <= 2 * noise[0] and resumed[1] <= 2 * noise[1], (noise, resumed)


@cuda
def test_cuda_bench_prints_both_speeds_and_two_compiled_graphs(capsys):
    torch._dynamo.reset()
    s, _ = run_main(capsys, "--stage bench --device cuda --batch-size 64 --num-workers 0")
    assert BENCH_KEYS <= set(s) and s["device"] == torch.cuda.get_device_name()
    assert s["compile"] is True and s["compiled_graphs"] == 2, s  # one per training step
    assert (
        s["pretrain_img_per_s"] > 0
        and s["finetune_img_per_s"] > 0
        and s["knn_seconds_per_checkpoint"] > 0
    )
