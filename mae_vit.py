"""Masked-autoencoder pre-training of a lightweight ViT on CIFAR, in one file.

Reference implementation of
    J. H. Tan, "Pre-training of Lightweight Vision Transformers on Small Datasets
    with Minimally Scaled Images", 2024 (arXiv:2402.03752).

32x32 CIFAR images are resized to 36x36 and cut into 144 patches of 3x3 pixels; an
all-zero dummy patch is appended as patch 145 and its encoded embedding is the
classification token. A 12-layer, width-192 ViT encoder (3.64 M parameters with its
classification head) is pre-trained as a masked autoencoder with a 4-layer decoder,
then fine-tuned with AutoAugment.

    python mae_vit.py --stage pretrain --dataset cifar10                    # Table 1
    python mae_vit.py --stage finetune --dataset cifar10 \
        --init runs/pretrain-cifar10/checkpoint.pth                          # Table 2
    python mae_vit.py --stage eval --init runs/finetune-cifar10/checkpoint.pth
    python mae_vit.py --stage bench                                          # speed

Paper, Table 3: 96.41% top-1 on CIFAR-10 and 78.27% on CIFAR-100, 3.64 M parameters.
This file has not been trained to those numbers here (no CIFAR, and a GPU only for
minutes). Speed, `--stage bench` on one NVIDIA H200, torch 2.11, compiled, bf16:
50k img/s pre-training, 32k img/s fine-tuning, the full recipe projected at 1.23 h.
README.md lists what was measured, where and how.
"""
import argparse
import json
import math
import os
import pickle
import signal
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
import torchvision
import torchvision.transforms.v2 as T
import torchvision.transforms.functional as TF

# ----------------------------------------------------------------------------------
# Recipes: Table 1 (pre-training) and Table 2 (fine-tuning). Every value can be
# overridden on the command line; what is not given comes from here.
# ----------------------------------------------------------------------------------
IMAGE_SIZE = 36      # §3: 32x32 CIFAR images minimally scaled to 36x36
PATCH = 3            # §3: 3x3 patches -> 12 x 12 = 144 patches
NUM_PATCHES = (IMAGE_SIZE // PATCH) ** 2           # 144 image patches
PATCH_DIM = 3 * PATCH * PATCH                      # 27 pixel values per patch
NUM_TOKENS = NUM_PATCHES + 1                       # + the dummy patch (§3) = 145
DIM, HEADS = 192, 3                                # §3.1: embedding size 192, 3 heads
ENCODER_DEPTH, DECODER_DEPTH = 12, 4               # §3.1: 12 encoder, 4 decoder layers
MLP_RATIO, DROPOUT = 2, 0.1                        # §3.1: MLP 192 -> 384 -> 192, dropout 0.1
MEAN, STD = 0.5, 0.5                               # Tables 1-2: colour normalization

PRETRAIN = dict(                     # Table 1
    epochs=4000,                     # total epochs
    warmup_epochs=400,               # warm-up epochs
    batch_size=1408,                 # batch size
    base_lr=1.5e-4,                  # base learning rate (lr = base * batch / 256, Eq. 2)
    weight_decay=0.05,               # AdamW weight decay
    crop_scale=(0.6, 1.0),           # random resized cropping
    mask_ratio=0.75,                 # §2: 75% of the patches are masked
    alpha=0.1,                       # discounting factor of Eq. 1
    layer_decay=1.0,                 # no layer-wise decay in pre-training
)
FINETUNE = dict(                     # Table 2
    epochs=300,
    warmup_epochs=20,
    batch_size=768,
    base_lr=1e-3,
    weight_decay=0.05,
    crop_scale=(0.8, 1.0),
    layer_decay=0.75,                # layer-wise decay (§3.3, after ELECTRA)
)
EVAL = dict(batch_size=1000)         # evaluation only: the largest batch that divides the test set is used
RECIPES = {"pretrain": PRETRAIN, "finetune": FINETUNE, "eval": EVAL, "bench": {}}
COMMON = dict(data_dir="./data", min_lr=0.0, save_every=20, seed=0)   # every stage; not in the tables
# Recipe flags that a stage never reads. Giving one is refused rather than ignored, so
# that no one believes a run used a value it never saw (eval of a finetune checkpoint
# also refuses --mask-ratio and --alpha: a classifier has no mask and no Eq. 1).
UNUSED = {
    "pretrain": (),
    "finetune": ("mask_ratio", "alpha"),
    "eval": ("epochs", "warmup_epochs", "base_lr", "weight_decay", "min_lr", "layer_decay", "save_every"),
    "bench": ("dataset", "epochs", "warmup_epochs", "base_lr", "weight_decay", "min_lr", "mask_ratio",
              "alpha", "layer_decay", "save_every"),
}


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit code 2, nothing written."""


# ----------------------------------------------------------------------------------
# Data: CIFAR python batches read into uint8 tensors by our own code (torchvision's
# dataset classes verify md5 sums, which rejects the small CIFAR-format sets of tests).
# ----------------------------------------------------------------------------------
CIFAR = {
    "cifar10": dict(folder="cifar-10-batches-py", label_key="labels", classes=10,
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
                    download=torchvision.datasets.CIFAR10),
    "cifar100": dict(folder="cifar-100-python", label_key="fine_labels", classes=100,
                     train=["train"], test=["test"], download=torchvision.datasets.CIFAR100),
}
DATASETS = ["cifar10", "cifar100", "cifar10+cifar100"]   # the merged set is §5's future work


def load_cifar(dataset, root, split):
    """Returns images uint8 (N, 3, 32, 32) and labels int64 (N,). 'a+b' concatenates."""
    data, labels = [], []
    for name in dataset.split("+"):
        spec = CIFAR[name]
        folder = os.path.join(root, spec["folder"])
        files = [os.path.join(folder, f) for f in spec[split]]
        if not all(os.path.isfile(f) for f in files):
            try:
                spec["download"](root, train=True, download=True)
            except Exception as e:
                raise UsageError(f"{name} not found: expected {', '.join(spec[split])} in {folder} "
                                 f"and the download failed ({type(e).__name__}); place the CIFAR "
                                 f"python batches there or run once with internet access") from None
        for f in files:
            rows, y = read_cifar_batch(f, spec)
            data.append(rows)
            labels.append(y)
    images = torch.from_numpy(np.concatenate(data)).view(-1, 3, 32, 32)   # rows are R, G, B planes
    return images, torch.from_numpy(np.concatenate(labels))


def read_cifar_batch(path, spec):
    """One pickled CIFAR batch -> uint8 rows (N, 3072) and int64 labels (N,), checked."""
    try:
        with open(path, "rb") as fh:
            batch = pickle.load(fh, encoding="latin1")
        rows = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3 * 32 * 32)
        y = np.asarray(batch[spec["label_key"]], dtype=np.int64)
        if len(rows) == 0:
            raise ValueError("it holds no images")
        if y.shape != (len(rows),) or not ((y >= 0) & (y < spec["classes"])).all():
            raise ValueError(f"{y.size} labels in [0, {spec['classes']}) expected for {len(rows)} images")
        return rows, y
    except Exception as e:
        why = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__
        raise UsageError(f"{path} is not a CIFAR python batch ({why}); delete it to download it again") from None


def normalize(images):
    """uint8 or [0, 255] float -> (x / 255 - mean) / std, as float32."""
    return (images.float() / 255 - MEAN) / STD


def crop_boxes(batch, H, W, scale, ratio=(3 / 4, 4 / 3), device="cpu"):
    """torchvision's RandomResizedCrop.get_params + RandomHorizontalFlip(0.5), drawn for a
    whole batch at once. Returns top, left, h, w (float tensors of whole numbers) and flip,
    each (B,)."""
    # Ten attempts per image, all at once; torchvision keeps the first box that fits.
    area = H * W * torch.empty(batch, 10, device=device).uniform_(*scale)
    log_ratio = torch.empty(batch, 10, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    w = (area * log_ratio.exp()).sqrt().round()                # (B, 10)
    h = (area / log_ratio.exp()).sqrt().round()
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = fits.int().argmax(1, keepdim=True)                 # first fitting attempt
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]  # (B,)
    none = ~fits.any(1)                  # torchvision's fallback: for a square image and a
    w = torch.where(none, W, w)          # ratio range holding 1 it is the whole image
    h = torch.where(none, H, h)
    top = (torch.rand(batch, device=device) * (H - h + 1)).floor()    # randint(0, H - h + 1)
    left = (torch.rand(batch, device=device) * (W - w + 1)).floor()
    flip = torch.rand(batch, device=device) < 0.5
    return top, left, h, w, flip


def crop_resize(images, top, left, h, w, flip, size=IMAGE_SIZE):
    """Crop each image to its box, resize it to size x size (bilinear, as F.interpolate)
    and flip it where asked, in one grid_sample. uint8 (B, 3, H, W) -> float (B, 3, size,
    size) in [0, 255]."""
    B, _, H, W = images.shape
    k = torch.arange(size, device=images.device) + 0.5           # output pixel centres
    # Source pixel of each output pixel (half-pixel convention of F.interpolate), clamped
    # to the box as cropping before resizing does; flipping reverses the columns.
    xs = (left[:, None] + k * (w / size)[:, None] - 0.5).clamp(left[:, None], (left + w - 1)[:, None])
    ys = (top[:, None] + k * (h / size)[:, None] - 0.5).clamp(top[:, None], (top + h - 1)[:, None])
    xs = torch.where(flip[:, None], xs.flip(1), xs)                        # (B, size)
    xs, ys = (2 * xs + 1) / W - 1, (2 * ys + 1) / H - 1                    # pixels -> [-1, 1]
    grid = torch.stack([xs[:, None, :].expand(B, size, size),
                        ys[:, :, None].expand(B, size, size)], -1)         # (B, size, size, 2)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border",
                         align_corners=False)


def crop_flip_normalize(images, scale):
    """Random resized crop (scale [0.6, 1] in Table 1, [0.8, 1] in Table 2) to 36x36,
    horizontal flip p = 0.5 and normalization, for a uint8 batch on its own device.
    (B, 3, 32, 32) uint8 -> (B, 3, 36, 36) float."""
    boxes = crop_boxes(len(images), images.shape[2], images.shape[3], scale, device=images.device)
    return normalize(crop_resize(images, *boxes))


def resize_test(images):
    """Test images: plain resize 32 -> 36 (bilinear), no augmentation. (B, 3, 36, 36)."""
    return F.interpolate(images.float(), size=IMAGE_SIZE, mode="bilinear", align_corners=False)


class AutoAugmented(torch.utils.data.Dataset):
    """Table 2's AutoAugment with the CIFAR-10 policy (on CIFAR-100 too, as §3.3 does),
    per image on the CPU, in DataLoader workers. It runs on the 32x32 image, before the
    crop and flip, which are done on the device for the whole batch (the paper gives no
    order; this one keeps the CPU work small). Items are (index, seed): each image's draws
    depend on its seed alone, so a resumed run sees what an unbroken one would have."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels
        self.autoaugment = T.AutoAugment(T.AutoAugmentPolicy.CIFAR10)   # v2: 1.4x v1's speed on PIL

    def __len__(self):
        return len(self.images)

    def __getitem__(self, item):
        index, seed = item
        with torch.random.fork_rng(devices=[]):              # leaves the caller's RNG alone
            torch.default_generator.manual_seed(seed)
            image = self.autoaugment(TF.to_pil_image(self.images[index]))
            return TF.pil_to_tensor(image), self.labels[index]            # (3, 32, 32) uint8


def epoch_order(n, seed, epoch):
    """The data order of one epoch, drawn from its own generator: (n,) int64 on the CPU."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


class RunBatches(torch.utils.data.Sampler):
    """Every fine-tuning batch of a run, epoch after epoch, as lists of (index, seed).
    One DataLoader pass over them serves the whole run, so the workers go on augmenting
    through the end of each epoch and the evaluation after it. (A loader restarted every
    epoch leaves them idle there, and the first step of the next epoch then waits for a
    whole batch per worker.) An epoch's order depends on (seed, epoch) alone; its last
    partial batch is dropped; `first` = (epoch, batch) is where a resumed run starts."""

    def __init__(self, n, batch_size, seed, epochs):
        self.n, self.batch_size, self.seed, self.epochs = n, batch_size, seed, epochs
        self.first = (0, 0)

    def __iter__(self):
        first_epoch, first_batch = self.first
        for epoch in range(first_epoch, self.epochs):
            order = epoch_order(self.n, self.seed, epoch).tolist()
            # Seed of the epoch's first draw, kept below the 2^63 that manual_seed accepts.
            base = (self.seed * 1_000_003 + epoch) * self.n % 2 ** 62
            for b in range(first_batch if epoch == first_epoch else 0, self.n // self.batch_size):
                yield [(order[i], base + i) for i in range(b * self.batch_size, (b + 1) * self.batch_size)]


def autoaugment_loader(images, labels, batch_size, seed, epochs, num_workers, pin_memory):
    """The run's fine-tuning batches (RunBatches) of AutoAugmented uint8 images, in pinned
    memory. Returns the loader and its batch sampler."""
    sampler = RunBatches(len(images), batch_size, seed, epochs)
    loader = torch.utils.data.DataLoader(
        AutoAugmented(images, labels), batch_sampler=sampler,
        num_workers=num_workers, pin_memory=pin_memory, worker_init_fn=ignore_stop_signals,
        prefetch_factor=4 if num_workers else None,
        generator=torch.Generator())          # its seed draw must not move the global RNG
    return loader, sampler


def ignore_stop_signals(worker_id):
    """DataLoader workers leave Ctrl-C and SIGTERM, which often reach the whole process
    group, to the main process: it saves and exits, and the loader then ends them."""
    for s in StopRequest.SIGNALS:
        signal.signal(s, signal.SIG_IGN)


# ----------------------------------------------------------------------------------
# Model (§2, §3.1)
# ----------------------------------------------------------------------------------
def patchify(images):
    """(B, 3, 36, 36) -> (B, 144, 27): 3x3 patches in row-major order, each flattened
    channel-first (c, dy, dx)."""
    B, C, H, W = images.shape
    g = H // PATCH
    x = images.reshape(B, C, g, PATCH, g, PATCH)            # (B, 3, 12, 3, 12, 3)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C * PATCH * PATCH)


def unpatchify(patches):
    """(B, 144, 27) -> (B, 3, 36, 36), the exact inverse of patchify."""
    B, N, _ = patches.shape
    g = int(N ** 0.5)
    x = patches.reshape(B, g, g, 3, PATCH, PATCH)           # (B, 12, 12, 3, 3, 3)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(B, 3, g * PATCH, g * PATCH)


def dropout(x, p, training):
    """F.dropout(x, p, training), with a cheaper mask on the CPU: PyTorch's CPU dropout
    draws one random number per element, which cost a fifth of a CPU pre-training step;
    here each int64 draw gives two 32-bit uniforms. Same keep probability (1 - p, to
    2^-32) and the same 1 / (1 - p) scale; on the GPU, F.dropout (fused when compiled)."""
    if not training or p == 0 or x.device.type != "cpu":
        return F.dropout(x, p, training)
    n = x.numel()
    words = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 1) // 2,), dtype=torch.int64)
    keep = words.view(torch.int32)[:n].view(x.shape) >= round(-2 ** 31 + p * 2 ** 32)
    return x * keep.to(x.dtype).mul_(1 / (1 - p))


# FlexAttention's tiles at 145 tokens (forward 64 queries x 32 keys; the backward pass's
# two loops), each the fastest tried on an H200 (README): flash's 128-query tiles pad 145
# to 256. Used from torch 2.11, the version measured.
FLEX_TILES = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_M1=32, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=32)
if torch.__version__ >= "2.11":          # a TorchVersion: compared as a version, not as text
    from torch.nn.attention.flex_attention import flex_attention
else:
    flex_attention = None


def attention(q, k, v):
    """softmax(q k^T / 8) v for (B, heads, N, 64) tensors. Which kernel computes it is a
    speed choice only; a GPU test checks that they agree. In bf16 on the GPU the 37 tokens
    of the pre-training encoder go to the memory-efficient kernel, and 145 tokens, when
    compiled, to FlexAttention with FLEX_TILES: against flash everywhere, about 41k ->
    49k img/s pre-training and 27k -> 30k fine-tuning on an H200 (README). Everything
    else (fp32, CPU, not compiled) is PyTorch's choice, so an outer sdpa_kernel(MATH)
    is obeyed there."""
    if q.is_cuda and q.dtype != torch.float32:
        if q.shape[2] <= 64:
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
                return F.scaled_dot_product_attention(q, k, v)
        if flex_attention is not None and torch.compiler.is_compiling():
            return flex_attention(q, k, v, kernel_options=FLEX_TILES)
    return F.scaled_dot_product_attention(q, k, v)


class Block(nn.Module):
    """One transformer layer (§3.1): self-attention, then an MLP 192 -> 384 -> 192 with
    ReLU. Every linear layer here has a bias (§3.1).

    Pre-norm (LayerNorm before each sublayer), a choice: the paper does not say. We take
    ViT's and MAE's placement because §2.1 says the encoder follows ViT, and because the
    extra LayerNorm before the final projection (§2.1) is what a pre-norm stack needs.
    """

    def __init__(self, dim=DIM, heads=HEADS, mlp_ratio=MLP_RATIO, dropout_p=DROPOUT):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)
        self.dropout_p = dropout_p
        # §3.1 uses PyTorch's default initialization. For attention, PyTorch's default is
        # nn.MultiheadAttention's: xavier-uniform input projection, zero biases.
        nn.init.xavier_uniform_(self.qkv.weight)
        nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):                                            # (B, N, 192)
        B, N, D = x.shape
        qkv = self.qkv(self.norm1(x)).view(B, N, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                         # each (B, 3, N, 64)
        a = attention(q, k, v)                                       # (B, 3, N, 64)
        x = x + self.proj(a.transpose(1, 2).reshape(B, N, D))        # (B, N, 192)
        # §3.1: "dropout 0.1 to the output of these [two linear] layers": after the ReLU
        # of the first and after the second. None on attention: the paper names none.
        h = dropout(F.relu(self.fc1(self.norm2(x))), self.dropout_p, self.training)   # (B, N, 384)
        return x + dropout(self.fc2(h), self.dropout_p, self.training)             # (B, N, 192)


def random_masking(noise, mask_ratio):
    """§2: mask `mask_ratio` of the 144 image patches of each image, uniformly, without
    replacement: the patches with the smallest `noise` (B, 144) uniform draws stay
    visible. The dummy patch is never masked and never counted among the 144.
    Returns
      keep    (B, 36 + 1) token indices the encoder sees, the dummy (index 144) last;
      restore (B, 144)    argsort of the shuffle: puts [visible, masked] back in image order;
      mask    (B, 144)    1.0 where a patch is masked."""
    batch = noise.shape[0]
    num_keep = int(NUM_PATCHES * (1 - mask_ratio))                   # 36 for 0.75
    shuffle = noise.argsort(1)                                       # a random permutation
    restore = shuffle.argsort(1)
    mask = (restore >= num_keep).float()              # the first num_keep of the shuffle stay
    dummy = torch.full((batch, 1), NUM_PATCHES, device=noise.device, dtype=shuffle.dtype)
    return torch.cat([shuffle[:, :num_keep], dummy], 1), restore, mask


class Encoder(nn.Module):
    """§2.1: bias-free patch embedding + 145 learnable positions, 12 blocks, LayerNorm,
    bias-free linear projection. Sees only the kept patches and the dummy in
    pre-training, all 145 tokens in fine-tuning."""

    def __init__(self, depth=ENCODER_DEPTH):
        super().__init__()
        self.patch_embed = nn.Linear(PATCH_DIM, DIM, bias=False)
        # Learnable positions (§2.1) with PyTorch's default for a learnable table
        # (nn.Embedding's N(0, 1)): §3.1 uses PyTorch's defaults throughout.
        self.pos_embed = nn.Parameter(torch.randn(NUM_TOKENS, DIM))
        self.blocks = nn.ModuleList(Block() for _ in range(depth))
        self.norm = nn.LayerNorm(DIM)
        self.proj = nn.Linear(DIM, DIM, bias=False)

    def forward(self, patches, keep=None):                           # (B, 144, 27)
        dummy = patches.new_zeros(patches.shape[0], 1, PATCH_DIM)   # §3: all-zero 145th patch
        x = self.patch_embed(torch.cat([patches, dummy], 1))        # (B, 145, 192)
        # Positions are added in the embedding's dtype, so under bf16 autocast the residual
        # stream between blocks stays bf16 (LayerNorm still computes in fp32): half the
        # memory traffic of an fp32 stream, 8% faster fine-tuning on an H200 (README).
        x = x + self.pos_embed.to(x.dtype)
        if keep is not None:                                         # pre-training: drop masked
            x = x.gather(1, keep[:, :, None].expand(-1, -1, DIM))   # (B, 37, 192)
        for block in self.blocks:
            x = block(x)
        return self.proj(self.norm(x))                               # (B, 37 or 145, 192)


class Decoder(nn.Module):
    """§2.2: encoded visible tokens + one shared learnable mask token at each masked
    position, in image order, + the decoder's own 145 positions; 4 blocks; LayerNorm;
    bias-free projection to the 27 pixel values of a patch (§2.3)."""

    def __init__(self, depth=DECODER_DEPTH):
        super().__init__()
        self.mask_token = nn.Parameter(torch.randn(DIM))
        self.pos_embed = nn.Parameter(torch.randn(NUM_TOKENS, DIM))
        self.blocks = nn.ModuleList(Block() for _ in range(depth))
        self.norm = nn.LayerNorm(DIM)
        self.proj = nn.Linear(DIM, PATCH_DIM, bias=False)

    def forward(self, encoded, restore):                             # (B, 37, 192), (B, 144)
        visible, dummy = encoded[:, :-1], encoded[:, -1:]
        B, num_keep, D = visible.shape
        masked = self.mask_token.to(visible.dtype).expand(B, NUM_PATCHES - num_keep, D)  # dtype: as Encoder
        x = torch.cat([visible, masked], 1)                          # (B, 144, 192) shuffled
        x = x.gather(1, restore[:, :, None].expand(-1, -1, D))       # (B, 144, 192) image order
        x = torch.cat([x, dummy], 1) + self.pos_embed.to(x.dtype)   # (B, 145, 192)
        for block in self.blocks:
            x = block(x)
        return self.proj(self.norm(x))[:, :NUM_PATCHES]              # (B, 144, 27)


# ----------------------------------------------------------------------------------
# Loss (Eq. 1) and the two models
# ----------------------------------------------------------------------------------
def mae_loss(pred, target, mask, alpha):
    """Eq. 1: Loss = MSE_masked_patches + alpha * MSE_unmasked_patches, on normalized
    pixels. pred, target (B, 144, 27); mask (B, 144), 1 = masked.
    At initialization the decoder's outputs have an expected mean square of 1/3 (LayerNorm,
    then 192 default-init weights of variance 1 / (3 x 192)), so the loss starts near
    (1 + alpha)(1/3 + mean target^2): 0.65 for CIFAR-10's pixel statistics, and Figure 3
    starts at 0.63."""
    per_patch = ((pred.float() - target) ** 2).mean(-1)             # (B, 144)
    mse_masked = (per_patch * mask).sum() / mask.sum()
    mse_unmasked = (per_patch * (1 - mask)).sum() / (1 - mask).sum()
    return mse_masked + alpha * mse_unmasked


class MAE(nn.Module):
    """Pre-training model (Figure 1): normalized images (B, 3, 36, 36) -> Eq. 1 loss,
    predicted patches (B, 144, 27), mask (B, 144)."""

    def __init__(self, mask_ratio=0.75, alpha=0.1):
        super().__init__()
        self.mask_ratio, self.alpha = mask_ratio, alpha
        self.encoder, self.decoder = Encoder(), Decoder()

    def forward(self, images, noise=None):
        """noise (B, 144) uniform draws decide the mask; drawn here unless given (the
        bench gives it, to compare two precisions on the same mask)."""
        target = patchify(images)                                    # (B, 144, 27)
        if noise is None:
            noise = torch.rand(images.shape[0], NUM_PATCHES, device=images.device)
        keep, restore, mask = random_masking(noise, self.mask_ratio)
        pred = self.decoder(self.encoder(target, keep), restore)
        return mae_loss(pred, target, mask, self.alpha), pred, mask


class Classifier(nn.Module):
    """Fine-tuning model (§3.3): the encoder + a linear layer on the dummy's embedding."""

    def __init__(self, num_classes):
        super().__init__()
        self.encoder = Encoder()
        self.head = nn.Linear(DIM, num_classes)

    def forward(self, images):                                       # (B, 3, 36, 36)
        return self.head(self.encoder(patchify(images))[:, -1])    # (B, classes)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------
# Schedules: Eq. 2, warm-up + cosine, layer-wise decay
# ----------------------------------------------------------------------------------
def peak_lr(base_lr, batch_size):
    return base_lr * batch_size / 256                                # Eq. 2 (linear scaling rule)


def learning_rate(step, peak, warmup_steps, total_steps, min_lr=0.0):
    """A pure function of the iteration. Phase 1: linear warm-up from 0 to `peak`.
    Phase 2: cosine decay from `peak` to `min_lr` at `total_steps` (§3.2, §3.3)."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def layer_id(name, depth=ENCODER_DEPTH):
    """Layer of a parameter for layer-wise decay: patch embedding and positions 0,
    encoder block i is i + 1, everything after the blocks depth + 1 (= 13)."""
    if name.startswith(("encoder.patch_embed", "encoder.pos_embed")):
        return 0
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    return depth + 1


def param_groups(model, weight_decay, layer_decay):
    """AdamW groups with lr_scale = layer_decay ** (13 - layer). Weight decay only on the
    weight matrices of linear layers; biases, LayerNorm, positions and the mask token are
    exempt (the paper is silent; this is MAE's and timm's convention)."""
    decayed = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    groups = {}
    for name, p in model.named_parameters():
        layer, decay = layer_id(name), id(p) in decayed
        group = groups.setdefault((layer, decay), dict(
            params=[], weight_decay=weight_decay if decay else 0.0,
            lr_scale=layer_decay ** (ENCODER_DEPTH + 1 - layer)))
        group["params"].append(p)
    return list(groups.values())


# ----------------------------------------------------------------------------------
# Checkpoints and logs. Checkpoints hold plain tensors and Python values only, so that
# they load with weights_only=True; every output is written so that a kill or a full
# disk leaves what was there before readable.
# ----------------------------------------------------------------------------------
RUN_ARGS = ("stage", "dataset", "batch_size", "base_lr", "weight_decay", "min_lr",
            "warmup_epochs", "mask_ratio", "alpha", "layer_decay", "seed", "init")
CHECKPOINT_KEYS = {"stage", "model", "optimizer", "epoch", "batch", "step", "args", "rng_cpu", "rng_cuda"}


def replace_file(path, write):
    """write(tmp) to path + '.tmp', then rename it over path (atomic). If that fails (a
    full disk, a lost mount) the run stops with one line, exit 1, and path is unchanged."""
    tmp = path + ".tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:   # on a full disk torch.save raises RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)                 # a half-written file would only fill the disk more
        write_failed(path, e)


def append_line(path, row):
    """One JSON line at the end of path (metrics.jsonl)."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as e:
        write_failed(path, e)


def write_failed(path, e):
    why = getattr(e, "strerror", None) or f"{type(e).__name__}; is the disk full?"
    raise SystemExit(f"error: could not write {path} ({why}); stopped, the files written "
                     f"before are unchanged")


def load_checkpoint(path):
    """A checkpoint written by this program, checked before anything uses it: the keys
    that resume and eval read, and weights of this architecture's names and shapes."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path} {'is a folder' if os.path.isdir(path) else 'does not exist'}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"{path} is not a checkpoint this program can read ({type(e).__name__})") from None
    args = ckpt.get("args") if isinstance(ckpt, dict) else None
    if (not isinstance(args, dict) or not CHECKPOINT_KEYS <= ckpt.keys()
            or not {*RUN_ARGS, "epochs", "data_dir"} <= args.keys() or args["stage"] != ckpt["stage"]
            or args["dataset"] not in (CIFAR if ckpt["stage"] == "finetune" else DATASETS)
            or not isinstance(ckpt["model"], dict)
            or not all(isinstance(ckpt[k], int) for k in ("epoch", "batch", "step"))):
        raise UsageError(f"{path} is not a mae_vit checkpoint")
    with torch.device("meta"):                    # shapes only: no memory, no random draws
        model = MAE() if ckpt["stage"] == "pretrain" else Classifier(CIFAR[args["dataset"]]["classes"])
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) if torch.is_tensor(v) else type(v).__name__ for k, v in ckpt["model"].items()}
    why = ([f"no {k}" for k in sorted(expected.keys() - found.keys())]
           + [f"unexpected {k}" for k in sorted(found.keys() - expected.keys())]
           + [f"{k} is {found[k]}, not {v}" for k, v in expected.items() if found.get(k, v) != v])
    if why:
        more = f" and {len(why) - 1} more" if len(why) > 1 else ""
        raise UsageError(f"{path} does not match this architecture ({why[0]}{more})")
    return ckpt


# ----------------------------------------------------------------------------------
# Training loop, shared by both stages: they differ in data, loss and lr groups only.
# ----------------------------------------------------------------------------------
class StopRequest:
    """While active, Ctrl-C (SIGINT) or SIGTERM (a cluster's pre-emption notice) only sets
    a flag; the loop finishes its step, saves and exits with 128 + the signal's number.
    The same signal a second time acts at once (checkpoints are written atomically)."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.requested = None                             # the signal received, if any
        self.previous = {s: signal.signal(s, self.handler) for s in self.SIGNALS}
        return self

    def handler(self, signum, frame):
        self.requested = signum
        signal.signal(signum, self.previous[signum])
        # os.write, not print: a handler that prints while the program is printing to the
        # same stream fails with "reentrant call".
        os.write(2, f"{signal.Signals(signum).name}: saving a checkpoint after this step "
                    f"(send it again to quit at once)\n".encode())

    def __exit__(self, *exc):
        for s, previous in self.previous.items():
            signal.signal(s, previous)


def make_optimizer(model, weight_decay, layer_decay, device):
    """AdamW (Tables 1-2); fused into a few kernels on the GPU. The lr is set every step."""
    return torch.optim.AdamW(param_groups(model, weight_decay, layer_decay), lr=0.0,
                             fused=device.type == "cuda")


def train_step(opt, step_loss, batch, lr, args):
    """One optimizer step at learning rate `lr`; returns the loss, still on the device.
    The lr is a plain float in the param groups, so changing it never recompiles."""
    for g in opt.param_groups:
        g["lr"] = lr * g["lr_scale"]
    with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.amp):
        loss = step_loss(batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def train(args, model, step_loss, batches, steps, evaluate, resume):
    """model: the raw module (saved); step_loss(batch) -> loss runs the (compiled) model.
    batches(epoch, start) yields the device batches of one epoch (`steps` batches) from
    batch `start`; evaluate() -> test accuracy, or None. Logs one console line and one
    metrics.jsonl line per epoch."""
    device = torch.device(args.device)
    opt = make_optimizer(model, args.weight_decay, args.layer_decay, device)
    peak = peak_lr(args.base_lr, args.batch_size)
    total, warmup = args.epochs * steps, args.warmup_epochs * steps
    own = (f"mask ratio {args.mask_ratio:g}, alpha {args.alpha:g}" if args.stage == "pretrain"
           else f"layer decay {args.layer_decay:g}")
    print(f"recipe: epochs {args.epochs} (warm-up {args.warmup_epochs}), batch {args.batch_size} "
          f"({steps} steps per epoch), peak lr {peak:.3g} (Eq. 2: {args.base_lr:g} x "
          f"{args.batch_size} / 256), weight decay {args.weight_decay:g}, {own}; {args.device}, "
          f"compile {'on' if args.compile else 'off'}, bf16 {'on' if args.amp else 'off'}", flush=True)
    if args.warmup_epochs >= args.epochs:         # e.g. a short run with Table 1's 400 epochs
        print(f"note: the warm-up ({args.warmup_epochs} epochs) is not shorter than the run "
              f"({args.epochs}), so the lr never reaches its peak; set --warmup-epochs",
              file=sys.stderr, flush=True)
    epoch, start = 0, 0
    if resume:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        epoch, start = resume["epoch"], resume["batch"]
        torch.set_rng_state(resume["rng_cpu"])
        if device.type == "cuda" and resume["rng_cuda"]:
            torch.cuda.set_rng_state_all(resume["rng_cuda"])
    ckpt_path, metrics = os.path.join(args.out, "checkpoint.pth"), os.path.join(args.out, "metrics.jsonl")

    def save(epoch, batch):
        state = dict(stage=args.stage, model=model.state_dict(), optimizer=opt.state_dict(),
                     epoch=epoch, batch=batch, step=epoch * steps + batch, args=vars(args),
                     rng_cpu=torch.get_rng_state(),
                     rng_cuda=torch.cuda.get_rng_state_all() if device.type == "cuda" else [])
        replace_file(ckpt_path, lambda tmp: torch.save(state, tmp))

    def check_finite(loss_sum, bad_step, epoch):
        if not torch.isfinite(loss_sum):
            kept = f"the last good checkpoint is {ckpt_path}" if os.path.exists(ckpt_path) else "no checkpoint"
            raise SystemExit(f"error: non-finite loss at epoch {epoch + 1}, step {int(bad_step) + 1}; "
                             f"stopped without saving ({kept})")

    def stopped(epoch, batch):
        print(f"interrupted ({signal.Signals(stop.requested).name}) after step "
              f"{epoch * steps + batch} ({epoch} epochs done); checkpoint saved. Resume with: "
              f"python mae_vit.py --stage {args.stage} --out {args.out} --resume", flush=True)
        raise SystemExit(128 + stop.requested)           # 130 for Ctrl-C, 143 for SIGTERM

    first_epoch, loss, accuracy = epoch, None, None
    model.train()
    with StopRequest() as stop:
        for epoch in range(epoch, args.epochs):
            t0, lr = time.time(), 0.0
            loss_sum = torch.zeros((), device=device)        # summed on the device: no sync per step
            bad_step = torch.full((), -1, device=device)     # first step whose loss was not finite
            for b, batch in enumerate(batches(epoch, start), start):
                step = epoch * steps + b
                lr = learning_rate(step, peak, warmup, total, args.min_lr)
                loss_t = train_step(opt, step_loss, batch, lr, args)
                loss_sum += loss_t
                bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss_t), step, bad_step)
                if stop.requested and b + 1 < steps:              # mid-epoch: save here
                    check_finite(loss_sum, bad_step, epoch)
                    save(epoch, b + 1)
                    stopped(epoch, b + 1)
            n = steps - start
            start = 0
            check_finite(loss_sum, bad_step, epoch)
            loss = loss_sum.item() / n                                   # one host sync per epoch
            seconds = time.time() - t0
            ips = n * args.batch_size / seconds                          # training only, no eval
            accuracy = evaluate() if evaluate else None
            model.train()
            # The ETA leaves out this process's first epoch, which includes torch.compile's
            # compilation when that is on, and after --resume may have begun mid-epoch.
            if epoch == first_epoch:
                t_first = time.time()
            timed = epoch - first_epoch                                  # epochs the ETA averages
            eta = (args.epochs - epoch - 1) * ((time.time() - t_first) / timed if timed else time.time() - t0)
            eta = (f"ETA {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}"
                   if timed or not (args.compile and eta) else "ETA after the next epoch")
            append_line(metrics, dict(epoch=epoch + 1, loss=loss, lr=lr, accuracy=accuracy,
                                      images_per_s=ips, seconds=seconds))
            acc = "" if accuracy is None else f" | test acc {100 * accuracy:.2f}%"
            print(f"epoch {epoch + 1}/{args.epochs} | loss {loss:.4f} | lr {lr:.2e}{acc} | "
                  f"{ips:,.0f} img/s | {seconds:.1f} s | {eta}", flush=True)
            if stop.requested or (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs:
                save(epoch + 1, 0)
            if stop.requested:
                stopped(epoch + 1, 0)
    return loss, accuracy


def eval_batch_size(n, limit):
    """The largest batch size <= limit that divides n: every batch has the same shape, so
    a compiled model compiles once and no image is dropped or padded."""
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


@torch.no_grad()
def accuracy_on(model, images, labels, args):
    """Top-1 accuracy on uint8 test images (N, 3, 32, 32) already on the device."""
    model.eval()
    bs, correct = eval_batch_size(len(images), args.batch_size), 0
    for i in range(0, len(images), bs):
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=args.amp):
            logits = model(normalize(resize_test(images[i:i + bs])))
        correct += (logits.argmax(1) == labels[i:i + bs]).sum()
    return int(correct) / len(images)


@torch.no_grad()
def reconstruction_on(model, images, args):
    """Eq. 1 on the test images with a fixed masking seed; the first batch's predictions."""
    model.eval()
    torch.manual_seed(args.seed)
    bs, total, first = eval_batch_size(len(images), args.batch_size), 0.0, None
    for i in range(0, len(images), bs):
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss, pred, mask = model(normalize(resize_test(images[i:i + bs])))
        total += loss.float() * len(pred)
        first = first or (pred.float(), mask)
    return float(total) / len(images), first


# ----------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------
def setup_device(args):
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        # cuDNN attention has had wrong results at sequence lengths that are not a
        # multiple of 128 (ours are 37 and 145): leave SDPA to flash / mem-efficient.
        if hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
            torch.backends.cuda.enable_cudnn_sdp(False)
    return device


def maybe_compile(model, args):
    return torch.compile(model, dynamic=False) if args.compile else model


def steps_per_epoch(num_images, args, resume):
    """Full batches only: the last partial batch is dropped (fixed shapes, one graph). A
    resumed run must see the training set it started on, or its position means nothing."""
    if num_images < args.batch_size:
        raise UsageError(f"--batch-size {args.batch_size} is larger than the {num_images} training images")
    steps = num_images // args.batch_size
    if resume and (resume["batch"] >= steps or resume["step"] != resume["epoch"] * steps + resume["batch"]):
        raise UsageError(f"{args.data_dir} holds {num_images} training images ({steps} batches per epoch), "
                         f"not the set the run in {args.out} trained on; resume it with its own --data-dir")
    return steps


def pretrain(args, resume):
    """§3.2 / Table 1. The training set lives on the device as uint8; order, crops, flips
    and masks are drawn there for the whole batch: no DataLoader."""
    device = setup_device(args)
    images, _ = load_cifar(args.dataset, args.data_dir, "train")
    steps = steps_per_epoch(len(images), args, resume)
    prepare_out(args, resume)
    images = images.to(device)
    model = MAE(args.mask_ratio, args.alpha).to(device)
    print(f"parameters: {count_parameters(model):,} (encoder {count_parameters(model.encoder):,})", flush=True)
    compiled = maybe_compile(model, args)

    def batches(epoch, start):
        order = epoch_order(len(images), args.seed, epoch).to(device)
        for b in range(start, steps):
            yield images[order[b * args.batch_size:(b + 1) * args.batch_size]]   # (B, 3, 32, 32) uint8

    def step_loss(batch):
        return compiled(crop_flip_normalize(batch, PRETRAIN["crop_scale"]))[0]

    loss, _ = train(args, model, step_loss, batches, steps, None, resume)
    return dict(final_loss=loss)


def finetune(args, resume):
    """§3.3 / Table 2: encoder (+ pre-trained weights from --init) and a linear head."""
    device = setup_device(args)
    model = Classifier(CIFAR[args.dataset]["classes"])
    if args.init and not resume:
        ckpt = load_checkpoint(args.init)
        if ckpt["stage"] != "pretrain":
            raise UsageError(f"--init {args.init} is a {ckpt['stage']} checkpoint; fine-tuning "
                             f"starts from a pretrain checkpoint (continue a run with --resume)")
        model.encoder.load_state_dict({k[len("encoder."):]: v for k, v in ckpt["model"].items()
                                       if k.startswith("encoder.")})
    images, labels = load_cifar(args.dataset, args.data_dir, "train")
    test_images, test_labels = load_cifar(args.dataset, args.data_dir, "test")
    steps = steps_per_epoch(len(images), args, resume)
    prepare_out(args, resume)
    model = model.to(device)
    print(f"parameters: {count_parameters(model):,}", flush=True)
    compiled = maybe_compile(model, args)
    loader, sampler = autoaugment_loader(images, labels, args.batch_size, args.seed, args.epochs,
                                         args.num_workers, device.type == "cuda")
    test_images, test_labels = test_images.to(device), test_labels.to(device)
    stream = None                             # the loader's one pass, begun at the first epoch

    def batches(epoch, start):
        nonlocal stream
        if stream is None:
            sampler.first = (epoch, start)
            stream = iter(loader)
        for _ in range(start, steps):
            x, y = next(stream)
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def step_loss(batch):
        x, y = batch
        return F.cross_entropy(compiled(crop_flip_normalize(x, FINETUNE["crop_scale"])), y)

    def evaluate():
        return accuracy_on(compiled, test_images, test_labels, args)

    loss, accuracy = train(args, model, step_loss, batches, steps, evaluate, resume)
    return dict(final_loss=loss, test_accuracy=accuracy)


def evaluate_stage(args, ckpt):
    """Top-1 accuracy of a fine-tuned checkpoint, or for a pre-trained one the Eq. 1 loss
    on the test split and a PNG of original | masked | reconstruction (Figure 4)."""
    device = setup_device(args)
    trained = ckpt["args"]
    if ckpt["stage"] == "finetune":
        classes = ckpt["model"]["head.weight"].shape[0]
        if args.dataset not in CIFAR or CIFAR[args.dataset]["classes"] != classes:
            raise UsageError(f"{args.init} classifies {classes} classes; {args.dataset} does not have {classes}")
        model = Classifier(classes)
    else:
        model = MAE(args.mask_ratio or trained["mask_ratio"], args.alpha if args.alpha is not None else trained["alpha"])
    model.load_state_dict(ckpt["model"])
    images, labels = load_cifar(args.dataset, args.data_dir, "test")
    prepare_out(args, None)
    model = model.to(device)
    compiled = maybe_compile(model, args)
    images, labels = images.to(device), labels.to(device)
    result = dict(checkpoint_stage=ckpt["stage"])
    if ckpt["stage"] == "finetune":
        result["test_accuracy"] = accuracy_on(compiled, images, labels, args)
        print(f"test accuracy: {100 * result['test_accuracy']:.2f}%")
    else:
        result["test_loss"], (pred, mask) = reconstruction_on(compiled, images, args)
        print(f"test reconstruction loss (Eq. 1): {result['test_loss']:.4f}")
        n = min(8, len(pred))
        original = normalize(resize_test(images[:n]))
        masked = unpatchify(patchify(original) * (1 - mask[:n, :, None]))        # masked -> 0 (grey)
        triplets = torch.stack([original, masked, unpatchify(pred[:n])], 1)       # (n, 3, 3, 36, 36)
        png = os.path.join(args.out, "reconstructions.png")
        replace_file(png, lambda tmp: torchvision.utils.save_image(
            triplets.flatten(0, 1) * STD + MEAN, tmp, format="png", nrow=6, padding=2))
        result["reconstructions"] = png
    append_line(os.path.join(args.out, "metrics.jsonl"), result)
    return result


def bench(args):
    """Images per second of the compiled training steps on synthetic data (no dataset),
    after warm-up, including the on-device augmentation of pre-training and, for
    fine-tuning, the CPU AutoAugment pipeline measured on its own."""
    from torch.utils.flop_counter import FlopCounterMode
    device = setup_device(args)
    cuda = device.type == "cuda"
    timed_steps = 50 if cuda else 5

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def time_steps(model, step_loss, batch_fn, layer_decay):
        """Steps per second of the training loop's own step, after 2 warm-up steps."""
        opt = make_optimizer(model, FINETUNE["weight_decay"], layer_decay, device)
        for i in range(2 + timed_steps):
            if i == 2:
                sync()
                t0 = time.perf_counter()
            train_step(opt, step_loss, batch_fn(), 1e-4, args)
        sync()
        return timed_steps / (time.perf_counter() - t0)

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    pre_bs = args.batch_size or (PRETRAIN["batch_size"] if cuda else 128)
    fine_bs = args.batch_size or (FINETUNE["batch_size"] if cuda else 128)
    mae = MAE().to(device)
    mae_c = maybe_compile(mae, args)
    pool = torch.randint(0, 256, (4 * pre_bs, 3, 32, 32), dtype=torch.uint8, device=device)
    pre_steps = time_steps(
        mae, lambda idx: mae_c(crop_flip_normalize(pool[idx], PRETRAIN["crop_scale"]))[0],
        lambda: torch.randint(0, len(pool), (pre_bs,), device=device), PRETRAIN["layer_decay"])
    clf = Classifier(10).to(device)
    clf_c = maybe_compile(clf, args)
    x = torch.randint(0, 256, (fine_bs, 3, 32, 32), dtype=torch.uint8, device=device)
    y = torch.randint(0, 10, (fine_bs,), device=device)
    fine_steps = time_steps(
        clf, lambda xy: F.cross_entropy(clf_c(crop_flip_normalize(xy[0], FINETUNE["crop_scale"])), xy[1]),
        lambda: (x, y), FINETUNE["layer_decay"])
    graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])   # training steps only
    # The fast path (compiled, bf16, attention()'s GPU kernels) against fp32 eager
    # with the math attention kernel and no TF32, on one batch and one mask, in eval mode
    # (no dropout): the relative difference of each stage's loss.
    def rel_diff(model, compiled, loss_of):
        model.eval()
        with torch.no_grad():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                fast = loss_of(compiled).float()
            precision = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision("highest")
            with sdpa_kernel(SDPBackend.MATH):
                exact = loss_of(model)
            torch.set_float32_matmul_precision(precision)
        return float((fast - exact).abs() / exact)

    pre_images = normalize(resize_test(pool[:pre_bs]))
    noise = torch.rand(pre_bs, NUM_PATCHES, device=device)
    loss_rel_diff = dict(pretrain=rel_diff(mae, mae_c, lambda m: m(pre_images, noise)[0]),
                         finetune=rel_diff(clf, clf_c, lambda m: F.cross_entropy(m(normalize(resize_test(x))), y)))
    # CPU side of fine-tuning: AutoAugment in DataLoader workers on synthetic images, timed
    # once the batches prefetched while the workers started have been taken.
    skipped = 2 * max(1, args.num_workers)
    n_batches = skipped + (128 if cuda else 12)
    fake = torch.randint(0, 256, (n_batches * fine_bs, 3, 32, 32), dtype=torch.uint8)
    loader, _ = autoaugment_loader(fake, torch.zeros(len(fake), dtype=torch.int64), fine_bs, 0, 1,
                                   args.num_workers, cuda)
    for i, (xb, _) in enumerate(loader):
        if i == skipped:
            t0 = time.perf_counter()
    loader_ips = (n_batches - 1 - skipped) * fine_bs / (time.perf_counter() - t0)
    # Multiply-accumulates per image of the classifier, counted on the model itself.
    # The paper's 0.26 G is what a counter that skips nn.MultiheadAttention (thop) gives:
    # it misses the q/k/v/out projections and the attention products, about 0.35 G.
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        clf(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE, device=device))
    macs = counter.get_total_flops() / 2
    pre_ips, fine_step_ips = pre_steps * pre_bs, fine_steps * fine_bs
    fine_ips = min(fine_step_ips, loader_ips)            # the two run side by side
    hours = (4000 * 50_000 / pre_ips + 300 * 50_000 / fine_ips) / 3600
    rows = [("pretrain step (incl. augmentation)", pre_bs, pre_ips),
            ("finetune step (incl. crop + flip)", fine_bs, fine_step_ips),
            (f"finetune AutoAugment loader ({args.num_workers} workers)", fine_bs, loader_ips)]
    print(f"device {device} ({torch.cuda.get_device_name() if cuda else 'cpu'}), torch {torch.__version__}, "
          f"compile={args.compile}, amp(bf16)={args.amp}")
    for name, bs, ips in rows:
        print(f"  {name:<44} batch {bs:>5}  {ips:>12,.0f} img/s")
    print(f"  MACs per image (true, flop_counter): {macs / 1e9:.3f} G; compiled graphs: {graphs}; "
          f"loss vs fp32: {loss_rel_diff['pretrain']:.1e} (pretrain), {loss_rel_diff['finetune']:.1e} (finetune) relative")
    print(f"  projected paper recipe (4000 + 300 epochs of 50,000 images): {hours:.2f} h")
    return dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                compile=args.compile, amp=args.amp, parameters=count_parameters(clf),
                macs_per_image=macs, pretrain_batch=pre_bs, finetune_batch=fine_bs,
                pretrain_img_per_s=pre_ips, finetune_step_img_per_s=fine_step_ips,
                finetune_loader_img_per_s=loader_ips, finetune_img_per_s=fine_ips,
                compiled_graphs=graphs, loss_rel_diff_vs_fp32=loss_rel_diff,
                projected_recipe_hours=hours)


# ----------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------
def finite(text):
    """argparse type of the real-valued flags: a NaN or infinite lr, decay, ratio or alpha
    is refused here rather than found as a non-finite loss an epoch later."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Unset recipe values come from Table 1 (pretrain) or Table 2 (finetune).")
    p.error = lambda message: p.exit(2, f"error: {message}\n")     # one line, exit 2
    p.add_argument("--stage", required=True, choices=["pretrain", "finetune", "eval", "bench"],
                   help="pretrain: Table 1; finetune: Table 2; eval: a checkpoint on the test split; "
                        "bench: speed on synthetic data")
    p.add_argument("--dataset", choices=DATASETS, help="cifar10+cifar100: §5's merged pre-training")
    p.add_argument("--data-dir", help="holds cifar-10-batches-py/, cifar-100-python/ (default ./data)")
    p.add_argument("--out", help="output folder (default runs/<stage>-<dataset>; "
                                 "eval: runs/eval-<checkpoint stage>-<dataset>; bench: none)")
    p.add_argument("--epochs", type=int, help="Table 1: 4000, Table 2: 300")
    p.add_argument("--warmup-epochs", type=int, help="Table 1: 400, Table 2: 20")
    p.add_argument("--batch-size", type=int, help="Table 1: 1408, Table 2: 768, eval: <= 1000")
    p.add_argument("--base-lr", type=finite, help="Eq. 2 base; Table 1: 1.5e-4, Table 2: 1e-3")
    p.add_argument("--weight-decay", type=finite, help="AdamW; Tables 1-2: 0.05")
    p.add_argument("--min-lr", type=finite, help="cosine floor, absolute; §5 suggests ~20%% of the peak (default 0)")
    p.add_argument("--mask-ratio", type=finite, help="§2: 0.75")
    p.add_argument("--alpha", type=finite, help="Eq. 1 discount on visible patches; Table 1: 0.1")
    p.add_argument("--layer-decay", type=finite, help="fine-tuning layer-wise lr decay; Table 2: 0.75")
    p.add_argument("--init", help="finetune: pretrain checkpoint (absent: from scratch); eval: checkpoint to evaluate")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint.pth")
    p.add_argument("--save-every", type=int, help="epochs between checkpoints, and at the end (default 20)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda when available, else cpu")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile (default: on for cuda, except eval)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, help="bf16 autocast (default: on for cuda)")
    p.add_argument("--seed", type=int, help="one seed for every run, as §3 (default 0)")
    p.add_argument("--num-workers", type=int, default=min(16, os.cpu_count() or 1),
                   help="fine-tuning DataLoader workers for AutoAugment (default: cores, at most 16)")
    return p.parse_args(argv)


def flag(key):
    """'batch_size' -> '--batch-size', for messages."""
    return "--" + key.replace("_", "-")


def resolve(args):
    """Fill what was not given: from the run being resumed, then from Table 1 / Table 2.
    Validates everything before anything is written."""
    for key in ("data_dir", "out", "init"):      # e.g. --init "$CKPT" with CKPT unset
        if getattr(args, key) == "":
            raise UsageError(f"{flag(key)} is empty")
    state = None                  # the checkpoint this run starts from, read once
    unused, where = UNUSED[args.stage], f"--stage {args.stage}"
    if args.stage == "eval":
        if not args.init:
            raise UsageError("--stage eval needs --init CHECKPOINT")
        state = load_checkpoint(args.init)
        args.dataset = args.dataset or state["args"]["dataset"]
        if state["stage"] == "finetune":
            unused, where = unused + UNUSED["finetune"], "eval of a finetune checkpoint"
    for key in unused:
        if getattr(args, key) is not None:
            raise UsageError(f"{flag(key)} has no effect on {where}; drop it")
    if args.resume:
        if args.stage not in ("pretrain", "finetune") or args.out is None:
            raise UsageError("--resume continues the pretrain or finetune run in --out DIR")
        state = load_checkpoint(os.path.join(args.out, "checkpoint.pth"))
        saved = state["args"]
        for key in RUN_ARGS:
            given = getattr(args, key)
            if given is not None and given != saved[key]:
                raise UsageError(f"{flag(key)} {given} conflicts with the run in {args.out} "
                                 f"(started with {saved[key]}); only --epochs may change on --resume")
            setattr(args, key, saved[key])
        args.epochs = saved["epochs"] if args.epochs is None else args.epochs
        args.data_dir = args.data_dir or saved["data_dir"]
        done = state["epoch"] + (state["batch"] > 0)          # a started epoch counts
        if args.epochs < done:
            raise UsageError(f"--epochs {args.epochs} is fewer than the {done} already begun in {args.out}")
        if args.epochs == state["epoch"]:
            print(f"note: the run in {args.out} has done all its {args.epochs} epochs; nothing to "
                  f"train (a larger --epochs extends it)", file=sys.stderr, flush=True)
    if args.stage in ("pretrain", "bench") and args.init:
        raise UsageError("--init is for finetune and eval; a pretraining run continues with --out DIR --resume")
    if args.stage == "bench" and args.out is not None:
        raise UsageError("--stage bench writes no files (its result is the JSON line it prints last); drop --out")
    if args.stage != "bench" and args.dataset is None:
        raise UsageError(f"--stage {args.stage} needs --dataset ({', '.join(DATASETS)})")
    if args.stage == "finetune" and args.dataset not in CIFAR:
        raise UsageError("fine-tuning needs a labelled dataset: --dataset cifar10 or cifar100")
    if args.out is None and args.stage != "bench":
        stage = f"eval-{state['stage']}" if args.stage == "eval" else args.stage
        args.out = os.path.join("runs", f"{stage}-{args.dataset}")
    for key, value in {**COMMON, **RECIPES[args.stage]}.items():
        if key in vars(args) and getattr(args, key) is None:
            setattr(args, key, value)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device} is not a device name (cpu, cuda, cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {args.device}: this program runs on cpu or cuda (cuda:N)")
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device is available")
    if cuda and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    # GPU defaults: torch.compile's Triton kernels need compute capability 7.0 (Volta), bf16
    # 8.0 (Ampere); older GPUs would emulate it slowly. Eval passes over the test set once,
    # so compiling it would cost more than it saves.
    capability = torch.cuda.get_device_capability(args.device) if cuda else (0, 0)
    if args.compile is None:
        args.compile = capability >= (7, 0) and args.stage != "eval"
    if args.amp is None:
        args.amp = capability >= (8, 0)
    for key in ("epochs", "batch_size", "base_lr", "save_every"):
        if getattr(args, key) is not None and getattr(args, key) <= 0:
            raise UsageError(f"{flag(key)} must be positive, got {getattr(args, key)}")
    if not 0 <= args.seed < 2 ** 32:
        raise UsageError(f"--seed must be in [0, 2^32), got {args.seed}")
    for key in ("warmup_epochs", "weight_decay", "min_lr", "alpha", "num_workers"):
        if getattr(args, key) is not None and getattr(args, key) < 0:
            raise UsageError(f"{flag(key)} must not be negative, got {getattr(args, key)}")
    if args.layer_decay is not None and not 0 < args.layer_decay <= 1:
        raise UsageError(f"--layer-decay must be in (0, 1], got {args.layer_decay}")
    if args.mask_ratio is not None:
        num_keep = int(NUM_PATCHES * (1 - args.mask_ratio))
        if not 0 < args.mask_ratio < 1 or not 0 < num_keep < NUM_PATCHES:
            raise UsageError(f"--mask-ratio {args.mask_ratio} must be in (0, 1) and leave at least one "
                             f"visible and one masked patch of {NUM_PATCHES}")
    if args.base_lr and args.batch_size and args.min_lr > peak_lr(args.base_lr, args.batch_size):
        raise UsageError(f"--min-lr {args.min_lr} is above the peak lr {peak_lr(args.base_lr, args.batch_size)}")
    return state


def resumable(args):
    """Whether --out holds a training run's checkpoint, the one thing --resume can continue."""
    return args.stage in ("pretrain", "finetune") and os.path.exists(os.path.join(args.out, "checkpoint.pth"))


def prepare_out(args, resume):
    """Refuse an output folder that holds another run, or one that cannot be written; on
    --resume, drop the log lines of epochs that will run again. Called after all input checks."""
    taken = [f for f in ("checkpoint.pth", "metrics.jsonl") if os.path.exists(os.path.join(args.out, f))]
    if taken and not resume:          # --resume is suggested only where it can work
        advice = ("use --resume to continue it or choose another --out" if resumable(args)
                  else "it has no checkpoint to resume, so choose another --out")
        raise UsageError(f"--out {args.out} already holds a run ({', '.join(taken)}); {advice}")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {args.out} cannot be created ({e.strerror})") from None
    if not os.access(args.out, os.W_OK):
        raise UsageError(f"--out {args.out} is not writable")
    metrics = os.path.join(args.out, "metrics.jsonl")
    if resume and os.path.exists(metrics):
        # A run killed between two checkpoints logged epochs that it now trains again: their
        # lines go (as TensorBoard's purge_step does), so each epoch is logged once.
        def epoch_of(number, line):
            try:
                epoch = json.loads(line)["epoch"]
            except (ValueError, KeyError, TypeError):
                epoch = None
            if not isinstance(epoch, int):
                raise UsageError(f"line {number} of {metrics} is not an epoch's record; "
                                 f"remove or fix it to resume")
            return epoch

        with open(metrics) as f:
            lines = f.readlines()
        kept = [line for number, line in enumerate(lines, 1)
                if line.endswith("\n") and epoch_of(number, line) <= resume["epoch"]]
        if len(kept) < len(lines):
            def write_kept(tmp):
                with open(tmp, "w") as f:            # closed here, so a failed flush raises
                    f.writelines(kept)

            replace_file(metrics, write_kept)
            print(f"note: {len(lines) - len(kept)} line(s) of {metrics} after epoch {resume['epoch']}, "
                  f"the checkpoint's, are dropped: those epochs run again", file=sys.stderr, flush=True)


def main(argv=None):
    args = parse_args(argv)
    try:
        state = resolve(args)
        torch.manual_seed(args.seed)
        if args.stage == "pretrain":
            result = pretrain(args, state)
        elif args.stage == "finetune":
            result = finetune(args, state)
        elif args.stage == "eval":
            result = evaluate_stage(args, state)
        else:
            result = bench(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError:           # e.g. Table 2's batch of 768 on a small GPU
        # A run with a checkpoint keeps its batch size (--resume refuses another one).
        advice = ("its checkpoint is kept: resume it where more GPU memory is free, or start a new "
                  "--out with a smaller --batch-size" if resumable(args)
                  else "a smaller --batch-size needs less (Eq. 2 scales the lr with it)")
        print(f"error: {args.device} ran out of memory at batch size {args.batch_size or 'default'}; {advice}",
              file=sys.stderr)
        return 1
    summary = dict(stage=args.stage, dataset=args.dataset, epochs=args.epochs, **result)
    if args.out:
        summary.update(out=args.out, checkpoint=os.path.join(args.out, "checkpoint.pth")
                       if args.stage in ("pretrain", "finetune") else None,
                       metrics=os.path.join(args.out, "metrics.jsonl"))
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
