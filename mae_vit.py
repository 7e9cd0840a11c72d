"""Masked-autoencoder pre-training of a lightweight ViT on CIFAR, in one file, in sections by
topic: J. H. Tan, "Pre-training of Lightweight Vision Transformers on Small Datasets with
Minimally Scaled Images", 2024 (arXiv:2402.03752). Table 3: 96.41% on CIFAR-10, 78.27% on
CIFAR-100, each pre-trained on its own set; 3.64 M parameters (3,636,490 here with CIFAR-10's
head); not yet reproduced here. `--stage bench` at a2aed25 (FlexAttention, no attention dropout),
one H200, torch 2.11, bf16, compiled: 50.5k img/s pre-training, 31.9k fine-tuning; 1.23 h projected.

    python mae_vit.py --stage pretrain --dataset cifar10     # §3.2, Table 1; then Table 2:
    python mae_vit.py --stage finetune --dataset cifar10 --init runs/pretrain-cifar10/checkpoint.pth
"""

import argparse
import datetime
import functools
import io
import json
import math
import os
import re
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF
import torchvision.transforms.v2 as T
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

# ==== The recipe: §3, §3.1, Tables 1-2 =========================================================

IMAGE_SIZE = 36  # §3: the 32x32 images are resized to 36x36
PATCH = 3  # §3: 3x3 patches
NUM_PATCHES = (IMAGE_SIZE // PATCH) ** 2  # 144
PATCH_DIM = 3 * PATCH * PATCH  # 27 pixel values a patch
NUM_TOKENS = NUM_PATCHES + 1  # 145: the patches and the all-zero dummy patch (§3)
DIM = 192  # §3.1: the embedding size of encoder and decoder
HEADS = 3  # §3.1: 3 heads of 64
ENCODER_DEPTH = 12  # §3.1
DECODER_DEPTH = 4  # §3.1
MLP_RATIO = 2  # §3.1: the MLP expands 192 -> 384, not ViT's 4x
DROPOUT = 0.1  # §3.1
# §3.1's ReLU, dropout 0.1, biases, init and LayerNorm ("Pytorch's default setup") are defaults
# of nn.TransformerEncoderLayer, which is post-norm: --no-norm-first, a literal reading. Pre-norm
# (ViT's, MAE's) is the default as it trains: after 15 + 6 epochs on a small real-image set,
# post-norm fine-tuned to 0.19 test accuracy (chance 0.10), pre-norm 0.747 (0.606 unpretrained).
NORM_FIRST = True
MEAN = 0.5  # Tables 1-2: colour normalization, every channel
STD = 0.5

# As displayed, Eq. 1 is the loss and Eq. 2 the learning-rate rule (§3.2-§3.3's text swaps the
# two). Every entry below has a flag of the same name.
PRETRAIN = dict(  # §3.2, Table 1
    epochs=4000,
    warmup_epochs=400,
    batch_size=1408,
    base_lr=1.5e-4,  # lr = base_lr * batch_size / 256 (Eq. 2)
    weight_decay=0.05,  # AdamW's
    crop_scale=(0.6, 1.0),  # random resized crop, then a flip with p = 0.5
    mask_ratio=0.75,  # §2: 75% of the 144 patches are masked
    alpha=0.1,  # Eq. 1: the discount of the loss on the visible patches
    layer_decay=1.0,  # not in Table 1: no layer-wise decay
)
FINETUNE = dict(  # §3.3, Table 2; also AutoAugment (CIFAR-10 policy), crop and flip
    epochs=300,
    warmup_epochs=20,
    batch_size=768,
    base_lr=1e-3,
    weight_decay=0.05,
    crop_scale=(0.8, 1.0),
    layer_decay=0.75,  # layer-wise lr decay, after ELECTRA [17]
)
# Table 2 has no mixup, CutMix, label smoothing, drop path or gradient clipping; none is used.
# Not in the tables: the data's folder, the cosine's floor (§5 suggests ~20% of the peak; the
# paper had none), epochs between checkpoints (Figure 5's 20, 1020, ...), §3's one seed.
COMMON = dict(data_dir="./data", min_lr=0.0, save_every=20, seed=0, norm_first=NORM_FIRST)
COMMON["device"] = "cuda" if torch.cuda.is_available() else "cpu"
CLASSES = {"cifar10": 10, "cifar100": 100}
EVAL_BATCH = 1000  # divides CIFAR's 50,000 and 10,000: evaluation batches have one shape


# ==== The model: §2, §3.1, Figures 1-2 =========================================================


def patchify(images):
    """(B, 3, 36, 36) -> (B, 144, 27): 3x3 patches, row-major, each as (channel, row, column)."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // PATCH, PATCH, W // PATCH, PATCH)  # (B, 3, 12, 3, 12, 3)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, 12, 12, 3, 3, 3)
    return x.reshape(B, -1, C * PATCH * PATCH)


def unpatchify(patches):
    """(B, 144, 27) -> (B, 3, 36, 36), patchify's inverse: §2.3's reshape of the output."""
    return F.fold(patches.transpose(1, 2), IMAGE_SIZE, PATCH, stride=PATCH)


class Block(nn.Module):
    """One transformer layer (§3.1, Figure 2): nn.TransformerEncoderLayer(192, 3, 384, 0.1,
    batch_first=True, norm_first=norm_first) written out; §3.1's ReLU, biases, init and LayerNorm
    are its defaults. Dropout acts on the attention weights and output, after the ReLU and the MLP.
    norm_first: LayerNorm before each sublayer (pre-norm), else after each residual addition."""

    def __init__(self, norm_first=NORM_FIRST):
        super().__init__()
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.norm2 = nn.LayerNorm(DIM)
        self.fc1 = nn.Linear(DIM, MLP_RATIO * DIM)
        self.fc2 = nn.Linear(MLP_RATIO * DIM, DIM)
        # nn.MultiheadAttention's init: xavier-uniform q/k/v projection, zero biases
        nn.init.xavier_uniform_(self.qkv.weight)
        nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.proj.bias)

    def attend(self, x):  # (B, N, 192)
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, HEADS, D // HEADS)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, HEADS, N, 64)
        dropout = DROPOUT if self.training else 0.0  # on the weights; SDPA has no eval mode
        heads = attention(q, k, v, dropout)  # (B, HEADS, N, 64); which kernel: see "Speed only"
        out = self.proj(heads.transpose(1, 2).reshape(B, N, D))
        return F.dropout(out, DROPOUT, self.training)

    def mlp(self, x):  # (B, N, 192)
        h = F.relu(self.fc1(x))  # (B, N, 384)
        h = F.dropout(h, DROPOUT, self.training)
        return F.dropout(self.fc2(h), DROPOUT, self.training)

    def forward(self, x):  # (B, N, 192)
        if self.norm_first:
            x = x + self.attend(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attend(x))
        return self.norm2(x + self.mlp(x))


def random_masking(noise, mask_ratio):
    """§2: masks `mask_ratio` of each image's 144 patches, uniformly, without replacement: those
    with the smallest (B, 144) uniform `noise` stay visible; the dummy is never masked (a choice).
    Returns keep (B, 37): the tokens the encoder sees, the dummy (index 144) last; restore (B, 144):
    puts [visible, masked] back in image order; mask (B, 144): 1 where a patch is masked."""
    num_keep = int(NUM_PATCHES * (1 - mask_ratio))  # 36 for 0.75
    shuffle = noise.argsort(1)  # a random permutation of the patches
    restore = shuffle.argsort(1)
    mask = (restore >= num_keep).float()  # the shuffle's first 36 stay visible
    dummy = torch.full_like(shuffle[:, :1], NUM_PATCHES)
    keep = torch.cat([shuffle[:, :num_keep], dummy], 1)
    return keep, restore, mask


class Encoder(nn.Module):
    """§2.1, Figure 2: bias-free patch embedding + 145 learnable positions, 12 blocks, LayerNorm,
    bias-free projection. It sees the kept patches and the dummy, or all 145 tokens."""

    def __init__(self, norm_first=NORM_FIRST):
        super().__init__()
        self.patch_embed = nn.Linear(PATCH_DIM, DIM, bias=False)  # §3.1: biases in blocks only
        # §2.1: learnable positions, not MAE's sinusoids; N(0, 1), nn.Embedding's default
        self.pos_embed = nn.Parameter(torch.randn(NUM_TOKENS, DIM))
        self.blocks = nn.Sequential(*[Block(norm_first) for _ in range(ENCODER_DEPTH)])
        self.norm = nn.LayerNorm(DIM)
        self.proj = nn.Linear(DIM, DIM, bias=False)

    def forward(self, patches, keep=None):  # (B, 144, 27); (B, 37) or None
        # §3: the all-zero 145th patch (zero after normalization: mid-grey). With no bias it
        # embeds to 0, so the token is its position pos_embed[144]: in effect a learned [CLS].
        dummy = patches.new_zeros(patches.shape[0], 1, PATCH_DIM)
        x = self.patch_embed(torch.cat([patches, dummy], 1))  # (B, 145, 192)
        # A speed choice: positions join in the embedding's dtype, so under autocast a pre-norm
        # stream is bf16 or fp16 (post-norm's LayerNorms give fp32); MAE's, timm's fp32 keep fp32.
        x = x + self.pos_embed.to(x.dtype)
        if keep is not None:  # pre-training: the masked patches are left out
            x = x.gather(1, keep[:, :, None].expand(-1, -1, DIM))  # (B, 37, 192)
        x = self.blocks(x)
        return self.proj(self.norm(x))  # (B, 37 or 145, 192)


class Decoder(nn.Module):
    """§2.2: encoded visible tokens and a shared, learnable mask token at the masked positions,
    + its own 145 positions; 4 blocks; LayerNorm; a bias-free projection to 27 pixels (§2.3)."""

    def __init__(self, norm_first=NORM_FIRST):
        super().__init__()
        self.mask_token = nn.Parameter(torch.randn(DIM))  # a choice: N(0, 1); MAE's N(0, 0.02²)
        self.pos_embed = nn.Parameter(torch.randn(NUM_TOKENS, DIM))  # §2.2: its own positions
        self.blocks = nn.Sequential(*[Block(norm_first) for _ in range(DECODER_DEPTH)])
        self.norm = nn.LayerNorm(DIM)
        self.proj = nn.Linear(DIM, PATCH_DIM, bias=False)

    def forward(self, encoded, restore):  # (B, 37, 192), (B, 144)
        visible = encoded[:, :-1]  # (B, 36, 192)
        dummy = encoded[:, -1:]  # (B, 1, 192)
        B, num_keep, D = visible.shape
        # the mask token joins in the stream's dtype, as the positions do in Encoder
        masked = self.mask_token.to(visible.dtype).expand(B, NUM_PATCHES - num_keep, D)
        x = torch.cat([visible, masked], 1)  # (B, 144, 192): visible first, then masked
        x = x.gather(1, restore[:, :, None].expand(-1, -1, D))  # (B, 144, 192), image order
        x = torch.cat([x, dummy], 1)  # (B, 145, 192)
        x = x + self.pos_embed.to(x.dtype)
        x = self.proj(self.norm(self.blocks(x)))  # (B, 145, 27)
        return x[:, :NUM_PATCHES]  # the dummy is no patch of the image


class MAE(nn.Module):
    """Pre-training (Figure 1): normalized images (B, 3, 36, 36) -> Eq. 1's loss, the predicted
    patches (B, 144, 27) and the mask (B, 144), chosen by `noise` (B, 144), drawn if not given."""

    def __init__(
        self, mask_ratio=PRETRAIN["mask_ratio"], alpha=PRETRAIN["alpha"], norm_first=NORM_FIRST
    ):
        super().__init__()
        self.mask_ratio = mask_ratio
        self.alpha = alpha
        self.encoder = Encoder(norm_first)
        self.decoder = Decoder(norm_first)

    def forward(self, images, noise=None):
        target = patchify(images)  # (B, 144, 27)
        if noise is None:
            noise = torch.rand(images.shape[0], NUM_PATCHES, device=images.device)
        keep, restore, mask = random_masking(noise, self.mask_ratio)
        encoded = self.encoder(target, keep)  # (B, 37, 192)
        pred = self.decoder(encoded, restore)  # (B, 144, 27)
        return mae_loss(pred, target, mask, self.alpha), pred, mask


class Classifier(nn.Module):
    """Fine-tuning (§3.3): the encoder and a linear layer on the dummy token's embedding."""

    def __init__(self, num_classes, norm_first=NORM_FIRST):
        super().__init__()
        self.encoder = Encoder(norm_first)
        # A choice: with a bias, as §3.1's bias-free rule covers the encoder's and decoder's
        self.head = nn.Linear(DIM, num_classes)

    def forward(self, images):  # (B, 3, 36, 36)
        encoded = self.encoder(patchify(images))  # (B, 145, 192)
        return self.head(encoded[:, -1])  # (B, classes), from the dummy token


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


# ==== The loss (Eq. 1) and the schedules: Eq. 2, warm-up + cosine, layer-wise decay ============


def mae_loss(pred, target, mask, alpha):
    """Eq. 1: MSE_masked_patches + alpha * MSE_unmasked_patches on pixels normalized as in Tables
    1-2 (not per patch, as MAE may); pred, target (B, 144, 27), mask (B, 144), 1 = masked. The
    first outputs' mean square is 1/3 (LayerNorm, then 192 weights of variance 1/576), so Eq. 1
    starts near (1 + alpha)(1/3 + mean target^2): 0.65 on CIFAR-10 (Figure 3: 0.63)."""
    per_patch = ((pred.float() - target) ** 2).mean(-1)  # (B, 144)
    visible = 1 - mask
    mse_masked = (per_patch * mask).sum() / mask.sum()
    mse_unmasked = (per_patch * visible).sum() / visible.sum()
    return mse_masked + alpha * mse_unmasked


def peak_lr(base_lr, batch_size):
    return base_lr * batch_size / 256  # Eq. 2, the linear scaling rule


def learning_rate(step, peak, warmup_steps, total_steps, min_lr):
    """A linear warm-up from 0 to `peak`, then a cosine decay to `min_lr` at `total_steps`
    (§3.2-§3.3). A pure function of the step: the paper counts epochs, this counts steps."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def layer_id(name):
    """A parameter's layer for §3.3's decay: patch embedding and positions 0, block i (e.g.
    "encoder.blocks.i.fc1.weight") i + 1, all after the last block 13 (norm, proj, head, decoder)"""
    if name.startswith(("encoder.patch_embed", "encoder.pos_embed")):
        return 0
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    return ENCODER_DEPTH + 1


def param_groups(model, weight_decay, layer_decay):
    """AdamW's groups, lr_scale = layer_decay ** (13 - layer). Weight decay, where the paper is
    silent: on linear layers' weight matrices only. Biases and LayerNorms are exempt, as in MAE
    and timm, and so, in both stages, are the positions and the mask token: learned inputs added
    to the stream, not weights that multiply it; decay would only pull them to zero. (MAE's
    fine-tuning exempts its positions too; its pre-training exempts 1-D tensors only, so it
    decays its mask token.)"""
    linear_weights = set()
    for module in model.modules():
        if isinstance(module, nn.Linear):
            linear_weights.add(id(module.weight))
    groups = {}
    for name, p in model.named_parameters():
        layer = layer_id(name)
        decayed = id(p) in linear_weights
        if (layer, decayed) not in groups:
            decay = weight_decay if decayed else 0.0
            scale = layer_decay ** (ENCODER_DEPTH + 1 - layer)
            groups[layer, decayed] = dict(params=[], weight_decay=decay, lr_scale=scale)
        groups[layer, decayed]["params"].append(p)
    return list(groups.values())


def make_optimizer(model, weight_decay, layer_decay, device):
    """AdamW (Tables 1-2), fused on a GPU; PyTorch's betas, as the paper gives none (MAE: 0.95)."""
    groups = param_groups(model, weight_decay, layer_decay)
    return torch.optim.AdamW(groups, lr=0.0, fused=device.type == "cuda")


# ==== Data and augmentation: §3, Tables 1-2 ====================================================


def load_cifar(dataset, root, split, device="cpu"):
    """uint8 images (N, 3, 32, 32) and labels (N,) of the "train" or "test" split, read by
    torchvision, which checks each file's md5 and downloads what is missing or corrupt."""
    cifar = getattr(torchvision.datasets, dataset.upper())  # CIFAR10 or CIFAR100
    try:
        data = cifar(root, train=split == "train", download=True)
    except Exception as e:  # offline, or the download failed
        folder = os.path.join(root, cifar.base_folder)
        raise UsageError(
            f"{dataset}: {folder} is missing or corrupt and the download failed "
            f"({type(e).__name__}); put the CIFAR files there or run once online"
        ) from None
    images = torch.from_numpy(data.data).permute(0, 3, 1, 2)  # (N, 32, 32, 3) -> (N, 3, 32, 32)
    return images.contiguous().to(device), torch.tensor(data.targets, device=device)


def normalize(images):
    return (images.float() / 255 - MEAN) / STD  # pixels 0-255 -> Tables 1-2's normalization


def resize_test(images):
    """Test images: a plain bilinear 32 -> 36 (a choice), no augmentation."""
    return F.interpolate(images.float(), size=IMAGE_SIZE, mode="bilinear", align_corners=False)


def crop_boxes(batch, height, width, scale, ratio=(3 / 4, 4 / 3), device="cpu"):
    """Random resized crop boxes and flips, each (B,), for a whole batch on the device, drawn as
    RandomResizedCrop.get_params (its default ratios 3/4-4/3: the paper gives none)."""
    # As torchvision: 10 tries per image, an area and a log-uniform aspect ratio each
    area = height * width * torch.empty(batch, 10, device=device).uniform_(*scale)
    log_ratio = torch.empty(batch, 10, device=device)
    log_ratio.uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = log_ratio.exp()
    w = (area * aspect).sqrt().round()  # (B, 10)
    h = (area / aspect).sqrt().round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    # The first try that fits; where none does, the whole image (torchvision's fallback here)
    first = fits.int().argmax(1, keepdim=True)
    none_fits = ~fits.any(1)
    w = torch.where(none_fits, width, w.gather(1, first)[:, 0])
    h = torch.where(none_fits, height, h.gather(1, first)[:, 0])
    top = (torch.rand(batch, device=device) * (height - h + 1)).floor()  # randint(0, H - h + 1)
    left = (torch.rand(batch, device=device) * (width - w + 1)).floor()
    flip = torch.rand(batch, device=device) < 0.5  # Tables 1-2: p = 0.5
    return top, left, h, w, flip


def crop_resize(images, top, left, h, w, flip, size=IMAGE_SIZE):
    """Each image cropped to its box, resized (bilinear) and flipped where asked in one
    grid_sample: pixel for pixel TF.resized_crop, then TF.hflip."""
    B, _, H, W = images.shape
    # Each output pixel's centre, mapped into its box by the half-pixel rule, kept inside it
    k = torch.arange(size, device=images.device) + 0.5
    xs = left[:, None] + k * (w / size)[:, None] - 0.5  # (B, size)
    ys = top[:, None] + k * (h / size)[:, None] - 0.5
    xs = xs.clamp(left[:, None], (left + w - 1)[:, None])
    ys = ys.clamp(top[:, None], (top + h - 1)[:, None])
    xs = torch.where(flip[:, None], xs.flip(1), xs)  # a flip reverses the columns
    xs = (2 * xs + 1) / W - 1  # pixels -> grid_sample's [-1, 1]
    ys = (2 * ys + 1) / H - 1
    grid_x = xs[:, None, :].expand(B, size, size)
    grid_y = ys[:, :, None].expand(B, size, size)
    grid = torch.stack([grid_x, grid_y], -1)  # (B, size, size, 2)
    return F.grid_sample(images.float(), grid, padding_mode="border", align_corners=False)


def crop_flip_normalize(images, scale):
    """Tables 1-2 on the device: crop of `scale`, resized to 36x36 in one step (a choice), flip."""
    B, _, H, W = images.shape
    top, left, h, w, flip = crop_boxes(B, H, W, scale, device=images.device)
    return normalize(crop_resize(images, top, left, h, w, flip))  # (B, 3, 36, 36)


class AutoAugmented(torch.utils.data.Dataset):
    """Table 2's AutoAugment, CIFAR-10 policy (on CIFAR-100 too, §3.3), in DataLoader workers, on
    the 32x32 image before the crop (the paper gives no order). Items are (index, seed): an
    image's draws depend on its seed only, so a resumed run sees the same augmentations."""

    def __init__(self, images, labels):
        self.images = images
        self.labels = labels
        self.policy = T.AutoAugment(T.AutoAugmentPolicy.CIFAR10)

    def __getitem__(self, item):
        index, seed = item
        image = TF.to_pil_image(self.images[index])
        with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG as it was
            torch.default_generator.manual_seed(seed)
            image = self.policy(image)
        return TF.pil_to_tensor(image), self.labels[index]


def epoch_order(n, seed, epoch):
    """An epoch's data order, from a seed of its own: the same in a resumed run."""
    # A prime above any epoch count: two (seed, epoch) pairs never share a seed
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


def run_batches(n, batch_size, seed, epochs, first_epoch=0):
    """Fine-tuning's full batches of (index, AutoAugment seed), a seed per image drawn, from
    `first_epoch` to the end: one DataLoader serves the run, so its workers start once."""
    for epoch in range(first_epoch, epochs):
        order = epoch_order(n, seed, epoch).tolist()
        first_seed = (seed * 1_000_003 + epoch) * n % 2**62  # as epoch_order's; below 2^63
        for b in range(n // batch_size):
            yield [(order[i], first_seed + i) for i in range(b * batch_size, (b + 1) * batch_size)]


# ==== The training loop of both stages (they differ in data, loss and lr groups) ===============


def autocast(args):
    """Autocast to --amp's bf16 or fp16 ("off": none); weights, AdamW's states, loss stay fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    return torch.autocast(torch.device(args.device).type, dtype=dtype, enabled=dtype is not None)


def pretrain_loss(mae, crop_scale, images):
    """Pre-training's step on uint8 images (B, 3, 32, 32): Eq. 1, and no accuracy to count."""
    loss, _, _ = mae(crop_flip_normalize(images, crop_scale))
    return loss, None


def finetune_loss(classifier, crop_scale, batch):
    """Fine-tuning's step: cross-entropy, and correct predictions counted on the device."""
    images, labels = batch
    logits = classifier(crop_flip_normalize(images, crop_scale))
    return F.cross_entropy(logits.float(), labels), (logits.argmax(1) == labels).sum()


def train_step(opt, scaler, step_loss, batch, lr, args):
    """One AdamW step at learning rate `lr`. Loss and count stay on the device: no host sync."""
    for group in opt.param_groups:
        group["lr"] = lr * group["lr_scale"]  # §3.3's layer-wise decay
    with autocast(args):
        loss, correct = step_loss(batch)
    # GradScaler (fp16; else plain backward, step): an overflowing step is skipped, the scale halved
    scaler.scale(loss).backward()
    scaler.step(opt)  # a fused AdamW reads the scale and the overflow flag on the device
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return loss.detach(), correct


def train(args, model, step_loss, batches, steps, resume, evaluate):
    """step_loss(batch) -> (loss, correct or None) runs the model, batches(epoch) yields `steps`
    batches, evaluate(epoch) returns metrics. Returns the log: a dict per epoch, resumed too."""
    if steps == 0:
        raise UsageError(f"--batch-size {args.batch_size} is larger than the training set")
    device = torch.device(args.device)
    opt = make_optimizer(model, args.weight_decay, args.layer_decay, device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    peak = peak_lr(args.base_lr, args.batch_size)
    warmup_steps = args.warmup_epochs * steps
    total_steps = args.epochs * steps
    print(f"parameters: {count_parameters(model):,} (encoder {count_parameters(model.encoder):,})")
    print(f"{steps} steps per epoch, peak lr {peak:.3g} (Eq. 2); run: {json.dumps(vars(args))}")
    first_epoch = 0
    log = []
    if resume:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        if resume.get("scaler"):  # an fp16 run's
            scaler.load_state_dict(resume["scaler"])
        torch.set_rng_state(resume["rng_cpu"])
        if device.type == "cuda" and resume["rng_cuda"] is not None:  # saved on a GPU too
            torch.cuda.set_rng_state(resume["rng_cuda"], device)
        first_epoch = resume["epoch"]
        log = resume["log"]  # metrics.jsonl at the checkpoint: later epochs run again
    model.train()
    for epoch in range(first_epoch, args.epochs):
        start = time.time()
        loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per step
        correct_sum = torch.zeros((), device=device)
        for b, batch in enumerate(batches(epoch)):
            step = epoch * steps + b
            lr = learning_rate(step, peak, warmup_steps, total_steps, args.min_lr)
            loss, correct = train_step(opt, scaler, step_loss, batch, lr, args)
            loss_sum += loss
            if correct is not None:
                correct_sum += correct
        # The epoch's one host sync; lr is its last step's
        row = dict(epoch=epoch + 1, loss=loss_sum.item() / steps, lr=lr)
        if not math.isfinite(row["loss"]):
            raise SystemExit(f"error: non-finite loss in epoch {epoch + 1}; last checkpoint kept")
        if correct is not None:  # fine-tuning: accuracy on its augmented batches (Figure 6)
            row["train_accuracy"] = correct_sum.item() / (steps * args.batch_size)
        row["images_per_s"] = steps * args.batch_size / (time.time() - start)  # training only
        row.update(evaluate(epoch + 1))
        model.train()
        log.append(row)
        lines = [json.dumps(logged) + "\n" for logged in log]
        write_file(os.path.join(args.out, "metrics.jsonl"), "".join(lines).encode())
        shown = [f"epoch {epoch + 1}/{args.epochs}"]
        for key in list(row)[1:]:  # all but the epoch
            shown.append(f"{key} {row[key]:.5g}")
        if epoch == first_epoch:  # it compiles: the ETA counts from its end
            first_end = time.time()
        else:
            left = (time.time() - first_end) / (epoch - first_epoch) * (args.epochs - epoch - 1)
            shown.append(f"ETA {datetime.timedelta(seconds=int(left))}")
        print(" | ".join(shown), flush=True)
        if (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs:
            save_checkpoint(args, model, opt, scaler, epoch + 1, log)
    return log


# ==== Evaluation: top-1 accuracy (Table 3), reconstructions (Figures 4-5), k-NN (not in paper) =


@torch.no_grad()
def evaluate_classifier(model, images, labels, args):
    """Top-1 accuracy and mean cross-entropy on uint8 test images (N, 3, 32, 32) on the device."""
    model.eval()
    correct = torch.zeros((), device=images.device)
    loss_sum = torch.zeros((), device=images.device)
    with autocast(args):
        for x, y in zip(images.split(EVAL_BATCH), labels.split(EVAL_BATCH)):
            logits = model(normalize(resize_test(x))).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
    return dict(test_loss=loss_sum.item() / len(images), test_accuracy=correct.item() / len(images))


@torch.no_grad()
def evaluate_mae(mae, images, noise, path, args):
    """Eq. 1 on uint8 test images masked by `noise` (N, 144); and Figure 4 of the first 8 at
    `path`: original | masked (grey) | reconstruction (all the decoder's output), 2 a row."""
    mae.eval()
    loss_sum = 0.0
    with autocast(args):
        for x, n in zip(images.split(EVAL_BATCH), noise.split(EVAL_BATCH)):
            loss, _, _ = mae(normalize(resize_test(x)), n)
            loss_sum += loss.item() * len(x)
        x = normalize(resize_test(images[:8]))
        _, pred, mask = mae(x, noise[:8])
    masked = unpatchify(patchify(x) * (1 - mask[:, :, None]))  # masked patches -> 0: grey
    triplets = torch.stack([x, masked, unpatchify(pred.float())], 1)  # (8, 3 pictures, ...)
    png = io.BytesIO()
    torchvision.utils.save_image(triplets.flatten(0, 1) * STD + MEAN, png, "png", nrow=6)
    write_file(path, png.getvalue())
    return loss_sum / len(images)


@torch.no_grad()
def knn_accuracy(encoder, train_images, train_labels, test_images, test_labels, k=20, t=0.07):
    """Not in the paper (its one signal in pre-training is the loss): the frozen encoder's top-1 by
    Wu et al.'s weighted k-NN, as in DINO: k most similar training images vote exp(cosine / t)."""

    def encode(images):  # unaugmented, unmasked; the L2-normalized dummy token (head's input)
        features = []
        for x in images.split(EVAL_BATCH):
            encoded = encoder(patchify(normalize(resize_test(x))))  # (b, 145, 192)
            features.append(F.normalize(encoded[:, -1].float(), dim=1))
        return torch.cat(features)

    encoder.eval()
    bank = encode(train_images)  # (N_train, 192)
    queries = encode(test_images)  # (N_test, 192)
    votes = torch.zeros(len(queries), int(train_labels.max()) + 1, device=bank.device)
    for i in range(0, len(queries), EVAL_BATCH):  # never all of (test x train) at once
        with torch.autocast(bank.device.type, enabled=False):  # fp32 (a GPU's TF32: see main)
            similarity = queries[i : i + EVAL_BATCH] @ bank.T  # (b, N_train)
        top, nearest = similarity.topk(min(k, len(bank)), dim=1)  # (b, k)
        votes[i : i + EVAL_BATCH].scatter_add_(1, train_labels[nearest], (top / t).exp())
    correct = (votes.argmax(1) == test_labels).sum()  # a tie goes to the lower class
    return int(correct) / len(test_labels)


# ==== Checkpoints and logs: plain values, each file written whole or not at all ================

CHECKPOINT_KEYS = {"stage", "model", "optimizer", "epoch", "args", "log", "rng_cpu", "rng_cuda"}
# Fixed on --resume (another value is refused); epochs, save_every, data_dir, amp may change
FIXED_ON_RESUME = ["dataset", "norm_first", "batch_size", "base_lr", "weight_decay", "min_lr"]
FIXED_ON_RESUME += ["warmup_epochs", "mask_ratio", "alpha", "layer_decay", "crop_scale", "seed"]
FIXED_ON_RESUME += ["init"]


def save_checkpoint(args, model, opt, scaler, epoch, log):
    """At an epoch's end: what an exact resume needs, in plain values (weights_only=True)."""
    state = dict(stage=args.stage, model=model.state_dict(), optimizer=opt.state_dict())
    state["scaler"] = scaler.state_dict()  # {} unless --amp fp16
    state.update(epoch=epoch, args=vars(args), log=log, rng_cpu=torch.get_rng_state())
    cuda = torch.device(args.device).type == "cuda"
    state["rng_cuda"] = torch.cuda.get_rng_state(args.device) if cuda else None
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_file(os.path.join(args.out, "checkpoint.pth"), buffer.getvalue())


def write_file(path, data):
    """Writes bytes beside `path`, then renames them over it. The rename is atomic: a kill or a
    full disk leaves the old file whole. A failed write stops the run with one line."""
    tmp = path + ".tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        raise SystemExit(f"error: could not write {path} ({e.strerror}); earlier files are kept")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, stage):
    """A checkpoint of `stage`: plain values (weights_only), ours, strictly this architecture."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path} does not exist (or is a folder)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"{path} is not a checkpoint this program can read ({type(e).__name__})")
    if not isinstance(ckpt, dict) or not CHECKPOINT_KEYS <= ckpt.keys():
        raise UsageError(f"{path} is not a mae_vit checkpoint")
    if ckpt["stage"] != stage:
        raise UsageError(f"{path} is a {ckpt['stage']} checkpoint, not a {stage} one")
    norm_first = ckpt["args"].setdefault("norm_first", True)  # older: pre-norm, no attn. dropout
    if isinstance(ckpt["args"].get("amp"), bool):  # older checkpoints: bf16 on or off
        ckpt["args"]["amp"] = "bf16" if ckpt["args"]["amp"] else "off"
    classes = CLASSES[ckpt["args"]["dataset"]]
    model = Classifier(classes, norm_first) if stage == "finetune" else MAE(norm_first=norm_first)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # "Error(s) in loading state_dict for MAE:\n\tsize mismatch ..."
        why = "; ".join(line.strip() for line in str(e).splitlines()[1:])
        raise UsageError(f"{path} does not match this architecture ({why})") from None
    return ckpt


# ==== The stages ===============================================================================


def maybe_compile(model, args):
    return torch.compile(model, dynamic=False) if args.compile else model


def pretrain(args, resume):
    """§3.2, Table 1, on uint8 images held on the device. At each checkpoint: Eq. 1 on the test
    split, the k-NN accuracy, Figure 4 (Figure 5's evolution, here on test images)."""
    images, labels = load_cifar(args.dataset, args.data_dir, "train", args.device)
    test_images, test_labels = load_cifar(args.dataset, args.data_dir, "test", args.device)
    steps = len(images) // args.batch_size  # fixed shapes: the last partial batch goes
    model = MAE(args.mask_ratio, args.alpha, args.norm_first).to(args.device)
    compiled = maybe_compile(model, args)
    encoder = maybe_compile(model.encoder, args)  # k-NN's, in eval mode
    generator = torch.Generator().manual_seed(args.seed)  # test masks, the same at each checkpoint
    noise = torch.rand(len(test_images), NUM_PATCHES, generator=generator).to(args.device)

    def batches(epoch):  # (B, 3, 32, 32) uint8, picked on the device
        order = epoch_order(len(images), args.seed, epoch).to(args.device)
        for b in range(steps):
            yield images[order[b * args.batch_size : (b + 1) * args.batch_size]]

    def evaluate(epoch):  # it draws no random number, so a resumed run stays exact
        if epoch % args.save_every != 0 and epoch != args.epochs:  # not a checkpoint's epoch
            return {}
        picture = os.path.join(args.out, f"reconstructions-epoch{epoch:04d}.png")
        test_loss = evaluate_mae(model, test_images, noise, picture, args)
        with autocast(args):
            knn = knn_accuracy(encoder, images, labels, test_images, test_labels)
        return dict(test_loss=test_loss, knn_accuracy=knn)

    step_loss = functools.partial(pretrain_loss, compiled, args.crop_scale)
    log = train(args, model, step_loss, batches, steps, resume, evaluate)
    return dict(log[-1], final_loss=log[-1]["loss"])  # the last epoch's row


def finetune(args, resume, init):
    """§3.3, Table 2: the encoder, pre-trained (--init) or from scratch, and a linear head."""
    model = Classifier(CLASSES[args.dataset], args.norm_first)
    if init:  # its encoder.* weights; the decoder's are left behind (checked: load_checkpoint)
        model.load_state_dict(init["model"], strict=False)
        print(f"init: the encoder pre-trained in {args.init}")
    elif not resume:
        print("init: none, so the encoder trains from scratch (--init gives a pre-trained one)")
    images, labels = load_cifar(args.dataset, args.data_dir, "train")  # for the DataLoader
    test_images, test_labels = load_cifar(args.dataset, args.data_dir, "test", args.device)
    steps = len(images) // args.batch_size  # fixed shapes: the last partial batch goes
    model = model.to(args.device)
    compiled = maybe_compile(model, args)
    first_epoch = resume["epoch"] if resume else 0
    index_batches = run_batches(len(images), args.batch_size, args.seed, args.epochs, first_epoch)
    # It gets a generator of its own, so that its seed draw leaves the global RNG alone
    loader = torch.utils.data.DataLoader(
        AutoAugmented(images, labels),
        batch_sampler=index_batches,
        num_workers=args.num_workers,
        pin_memory=torch.device(args.device).type == "cuda",
        generator=torch.Generator(),
    )
    stream = iter(loader)

    def batches(epoch):  # the next `steps` batches of the run's one DataLoader
        for _ in range(steps):
            x, y = next(stream)
            yield x.to(args.device, non_blocking=True), y.to(args.device, non_blocking=True)

    def evaluate(epoch):
        return evaluate_classifier(compiled, test_images, test_labels, args)

    step_loss = functools.partial(finetune_loss, compiled, args.crop_scale)
    log = train(args, model, step_loss, batches, steps, resume, evaluate)
    # §4.2: CIFAR-100 overfits. The best epoch is picked on the test split, and not saved
    best = max(log, key=lambda row: row["test_accuracy"])
    print(f"best test accuracy {best['test_accuracy']:.4f}, epoch {best['epoch']} (test split)")
    best_row = dict(best_test_accuracy=best["test_accuracy"], best_epoch=best["epoch"])
    return dict(log[-1], final_loss=log[-1]["loss"], **best_row)


def evaluate_checkpoint(args, checkpoint):
    """--stage eval: a fine-tuned classifier's top-1 accuracy and loss on the test split."""
    images, labels = load_cifar(args.dataset, args.data_dir, "test", args.device)
    model = Classifier(CLASSES[args.dataset], args.norm_first).to(args.device)
    model.load_state_dict(checkpoint["model"])
    result = evaluate_classifier(maybe_compile(model, args), images, labels, args)
    write_file(os.path.join(args.out, "metrics.jsonl"), (json.dumps(result) + "\n").encode())
    return result


# ==== Speed only: attention kernels and --stage bench; the math is the same ====================


def attention(q, k, v, dropout):
    """softmax(q k^T / 8) v, each (B, 3, N, 64), `dropout` on the weights (nn.MultiheadAttention's).
    Under AMP on a GPU, up to 64 tokens (pre-training's encoder: 37) by the memory-efficient kernel,
    faster there than flash's 128-token tiles (timed in bf16, no dropout); else PyTorch's pick."""
    if q.is_cuda and q.dtype != torch.float32 and q.shape[2] <= 64:
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)


def bench(args):
    """On random data: img/s of both training steps as train() runs them, their compiled graphs,
    k-NN's seconds at a checkpoint, MACs, parameters and the recipe's projected training time."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    pretrain_batch = args.batch_size or PRETRAIN["batch_size"]
    finetune_batch = args.batch_size or FINETUNE["batch_size"]
    images = torch.randint(0, 256, (4 * pretrain_batch, 3, 32, 32), dtype=torch.uint8).to(device)
    labels = torch.randint(0, 10, (len(images),), device=device)

    def images_per_second(model, recipe, step_loss, batch, batch_size):
        opt = make_optimizer(model, recipe["weight_decay"], recipe["layer_decay"], device)
        scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
        for _ in range(2):  # they compile
            loss, _ = train_step(opt, scaler, step_loss, batch, 1e-4, args)
        loss.item()  # waits for the device
        start = time.perf_counter()
        repeats = 50 if cuda else 5
        for _ in range(repeats):
            loss, _ = train_step(opt, scaler, step_loss, batch, 1e-4, args)
        loss.item()
        return batch_size * repeats / (time.perf_counter() - start)

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    mae = MAE(norm_first=args.norm_first).to(device)
    step_loss = functools.partial(pretrain_loss, maybe_compile(mae, args), PRETRAIN["crop_scale"])
    batch = images[:pretrain_batch]
    pretrain_ips = images_per_second(mae, PRETRAIN, step_loss, batch, pretrain_batch)
    classifier = Classifier(10, args.norm_first).to(device)
    compiled = maybe_compile(classifier, args)
    step_loss = functools.partial(finetune_loss, compiled, FINETUNE["crop_scale"])
    batch = (images[:finetune_batch], labels[:finetune_batch])
    finetune_ips = images_per_second(classifier, FINETUNE, step_loss, batch, finetune_batch)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # the two training steps'
    # k-NN at a checkpoint, on 60,000 images; the second pass is timed (the first compiles)
    encoder = maybe_compile(mae.encoder, args)
    with autocast(args):
        for _ in range(2):
            start = time.perf_counter()
            knn_accuracy(encoder, images, labels, images[:pretrain_batch], labels[:pretrain_batch])
    knn_seconds = (time.perf_counter() - start) * 60_000 / (len(images) + pretrain_batch)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        classifier(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE, device=device))
    # 0.62 G; Table 3's 0.26 G leaves out the whole attention module, projections included
    macs = counter.get_total_flops() / 2
    pretrain_hours = PRETRAIN["epochs"] * 50_000 / pretrain_ips / 3600
    finetune_hours = FINETUNE["epochs"] * 50_000 / finetune_ips / 3600
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    result = dict(device=name, torch=torch.__version__, compile=args.compile, amp=args.amp)
    result.update(parameters=count_parameters(classifier), macs_per_image=macs)
    result.update(pretrain_img_per_s=pretrain_ips, finetune_img_per_s=finetune_ips)
    result.update(compiled_graphs=graphs, knn_seconds_per_checkpoint=knn_seconds)
    result.update(projected_recipe_hours=pretrain_hours + finetune_hours)
    return result


# ==== Command line =============================================================================


class UsageError(Exception):
    """Bad input: one line, exit code 2, nothing written."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, without argparse's usage text
        self.exit(2, f"error: {message}\n")


def parse_args(argv=None):
    """The flags. A recipe flag left out stays None until check_args fills it in."""
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", required=True, choices=["pretrain", "finetune", "eval", "bench"])
    p.add_argument("--dataset", choices=list(CLASSES))
    p.add_argument("--data-dir", help="where CIFAR is, or goes (default: ./data)")
    p.add_argument("--out", help="the run's folder (default: runs/<stage>-<dataset>)")
    p.add_argument("--epochs", type=int, help="Tables 1-2; more on --resume stretch the cosine")
    p.add_argument("--warmup-epochs", type=int, help="Tables 1-2")
    p.add_argument("--batch-size", type=int, help="Tables 1-2; Eq. 2 scales the lr with it")
    p.add_argument("--base-lr", type=float, help="Tables 1-2, Eq. 2")
    p.add_argument("--weight-decay", type=float, help="Tables 1-2")
    p.add_argument("--min-lr", type=float, help="cosine's floor, an lr (§5: ~0.2 x Eq. 2's)")
    p.add_argument("--mask-ratio", type=float, help="§2 (default 0.75)")
    p.add_argument("--alpha", type=float, help="Eq. 1 (default 0.1)")
    p.add_argument("--layer-decay", type=float, help="Table 2 (pre-training: 1, none)")
    p.add_argument("--crop-scale", type=float, nargs=2, metavar=("MIN", "MAX"), help="Tables 1-2")
    p.add_argument("--init", help="finetune: a pretrain checkpoint; eval: a finetune one")
    p.add_argument("--resume", action="store_true", help="go on with the run in --out")
    p.add_argument("--save-every", type=int, help="epochs between checkpoints (default 20)")
    p.add_argument("--seed", type=int, help="§3's one seed of a run (default 0)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda where there is one)")
    toggle = argparse.BooleanOptionalAction  # --flag and --no-flag
    p.add_argument("--compile", action=toggle, help="default: on a GPU")
    p.add_argument("--amp", choices=["bf16", "fp16", "off"], help="default: by the GPU (README)")
    p.add_argument("--norm-first", action=toggle, help="pre- or post-norm; --init, eval: their own")
    p.add_argument("--num-workers", type=int, default=min(16, os.cpu_count() or 1))
    args = p.parse_args(argv)
    if args.crop_scale is not None:
        args.crop_scale = tuple(args.crop_scale)  # as a checkpoint saves it, for --resume
    return args


def check_args(args):
    """Checks the flags, fills in the rest (a resumed run's, a checkpoint's, the tables' values);
    returns the checkpoints the stage starts from, (resume, init), each None where none."""
    for key in ("epochs", "batch_size", "base_lr", "save_every"):
        if getattr(args, key) is not None and not 0 < getattr(args, key) < math.inf:
            raise UsageError(f"--{key.replace('_', '-')} must be a positive number")
    for key in ("warmup_epochs", "weight_decay", "min_lr", "alpha", "num_workers"):
        if getattr(args, key) is not None and not 0 <= getattr(args, key) < math.inf:
            raise UsageError(f"--{key.replace('_', '-')} must be a non-negative number")
    ratio = args.mask_ratio
    if ratio is not None and not (0 < ratio < 1 and NUM_PATCHES * (1 - ratio) >= 1):
        raise UsageError(f"--mask-ratio {ratio} must be in (0, 1) and leave a patch visible")
    if args.layer_decay is not None and not 0 < args.layer_decay <= 1:
        raise UsageError("--layer-decay must be in (0, 1]")
    if args.crop_scale is not None and not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1:
        raise UsageError("--crop-scale must be MIN MAX with 0 < MIN <= MAX <= 1")
    if args.seed is not None and not 0 <= args.seed < 2**32:
        raise UsageError("--seed must be in [0, 2^32)")
    if args.stage == "eval" and not args.init:
        raise UsageError("--stage eval needs --init CHECKPOINT, a finetune checkpoint")
    if args.init and args.stage in ("pretrain", "bench"):
        raise UsageError("--init is for finetune and eval (pre-training goes on with --resume)")
    if args.resume and (args.stage not in ("pretrain", "finetune") or not args.out):
        raise UsageError("--resume goes on with the pretrain or finetune run in --out DIR")
    resume = None
    init = None
    run = {}  # the values that a resumed run or an evaluated checkpoint brings
    if args.resume:
        resume = load_checkpoint(os.path.join(args.out, "checkpoint.pth"), args.stage)
        for key in FIXED_ON_RESUME:
            if getattr(args, key) not in (None, resume["args"][key]):
                raise UsageError(
                    f"--{key.replace('_', '-')} {getattr(args, key)} conflicts with the run in "
                    f"{args.out}; on --resume only --epochs, --save-every, --data-dir, --amp change"
                )
        for key in [*FIXED_ON_RESUME, "epochs", "data_dir", "save_every", "amp"]:
            run[key] = resume["args"][key]
    elif args.init and args.stage == "finetune":
        init = load_checkpoint(args.init, "pretrain")
    elif args.init:  # eval: the run's data
        init = load_checkpoint(args.init, "finetune")
        run = dict(dataset=init["args"]["dataset"], data_dir=init["args"]["data_dir"])
    if init:  # the layer is part of the model: the checkpoint's builds it
        run["norm_first"] = init["args"]["norm_first"]
        if args.norm_first not in (None, run["norm_first"]):
            raise UsageError(f"{args.init} has norm_first={run['norm_first']}; leave the flag out")
    recipe = {"pretrain": PRETRAIN, "finetune": FINETUNE}.get(args.stage, {})
    for key, value in {**COMMON, **recipe, **run}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not args.dataset and args.stage != "bench":
        raise UsageError(f"--stage {args.stage} needs --dataset cifar10 or cifar100")
    if args.stage == "eval" and args.dataset != init["args"]["dataset"]:
        raise UsageError(f"{args.init} classifies {init['args']['dataset']}, not {args.dataset}")
    if resume and args.epochs < resume["epoch"]:
        raise UsageError(f"--epochs {args.epochs}: the run has done {resume['epoch']} already")
    if args.base_lr and args.min_lr > peak_lr(args.base_lr, args.batch_size):
        raise UsageError(f"--min-lr {args.min_lr} is above Eq. 2's peak lr")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        raise UsageError(f"--device {args.device} is not a device name; it runs on cpu or cuda")
    device = torch.device(args.device)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and (device.index or 0) >= gpus:
        raise UsageError(f"--device {args.device}: this machine has {gpus} CUDA device(s)")
    if not args.out and args.stage != "bench":  # also --out "" (an unset shell variable)
        args.out = os.path.join("runs", f"{args.stage}-{args.dataset}")
    if args.out and os.path.isfile(args.out):
        raise UsageError(f"--out {args.out} is a file, not a folder")
    for name in ("checkpoint.pth", "metrics.jsonl"):
        if args.out and not args.resume and os.path.exists(os.path.join(args.out, name)):
            raise UsageError(f"--out {args.out} has a run ({name}); use another --out")
    # On a GPU: torch.compile (Triton) from compute capability 7.0; autocast to bf16 from 8.0, to
    # fp16 on 7.x's tensor cores and on the P100 (6.0: fp16 at twice fp32's rate), else none (other
    # 6.x GPUs run fp16 at 1/64 of it). Eval passes over the test set once: compiling would not pay.
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)
    if args.compile is None:
        args.compile = capability >= (7, 0) and args.stage != "eval"
    fast_fp16 = capability >= (7, 0) or capability == (6, 0)
    if args.amp is None and capability >= (8, 0):
        args.amp = "bf16"
    elif args.amp is None:
        args.amp = "fp16" if fast_fp16 else "off"  # the CPU's capability here is (0, 0)
    return resume, init


def main(argv=None):
    args = parse_args(argv)
    try:
        resume, init = check_args(args)
        torch.manual_seed(args.seed)
        if torch.device(args.device).type == "cuda":
            torch.cuda.set_device(torch.device(args.device).index or 0)  # "cuda" is GPU 0
            torch.set_float32_matmul_precision("high")  # a choice: TF32 matmuls in fp32 runs
            # Not cuDNN attention: it has been wrong at lengths not multiples of 128 (37, 145)
            torch.backends.cuda.enable_cudnn_sdp(False)
        if args.stage == "pretrain":
            result = pretrain(args, resume)
        elif args.stage == "finetune":
            result = finetune(args, resume, init)
        elif args.stage == "eval":
            result = evaluate_checkpoint(args, init)
        else:
            result = bench(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError:  # e.g. Table 2's batch of 768 on a small GPU
        print(f"error: out of memory (--batch-size {args.batch_size}); try less", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: checkpoints are written whole, so the last one is good
        command = f"python mae_vit.py --stage {args.stage} --out {args.out} --resume"
        go_on = f"; to go on: {command}" if args.stage in ("pretrain", "finetune") else ""
        print(f"interrupted{go_on}", file=sys.stderr)
        return 130
    summary = dict(stage=args.stage, dataset=args.dataset, epochs=args.epochs, **result)
    print(json.dumps(dict(summary, out=args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
