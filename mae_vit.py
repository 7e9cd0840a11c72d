"""Masked-autoencoder pre-training of a lightweight ViT on CIFAR, in one file.

J. H. Tan, "Pre-training of Lightweight Vision Transformers on Small Datasets with Minimally Scaled Images", 2024
(arXiv:2402.03752). In the paper's order: Tables 1-2, model, Eq. 1, schedules, data; then loop, evaluation, CLI.

    python mae_vit.py --stage pretrain --dataset cifar10                    # §3.2, Table 1
    python mae_vit.py --stage finetune --dataset cifar10 --init runs/pretrain-cifar10/checkpoint.pth   # §3.3, Table 2
    python mae_vit.py --stage eval --init runs/finetune-cifar10/checkpoint.pth     # top-1 on the test split
    python mae_vit.py --stage bench                                          # img/s of both training steps

Table 3: 96.41% top-1 on CIFAR-10 (pre-trained on it), 78.27% on CIFAR-100 (likewise), 3.64 M parameters (3,636,490
here), not yet reproduced with this file. `python mae_vit.py --stage bench` at commit a2aed25, one NVIDIA H200, torch
2.11, bf16, compiled: 50.5k img/s pre-training, 31.9k fine-tuning, the recipe's training steps in a projected 1.23 h.
"""
import argparse
import datetime
import json
import math
import os
import pathlib
import re
import signal
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2 as T
import torchvision.transforms.functional as TF
from torch.nn.attention import SDPBackend, sdpa_kernel

# ==== The recipe: §3, §3.1, Tables 1-2 ================================================================================
IMAGE_SIZE, PATCH = 36, 3                  # §3: 32x32 images resized to 36x36, 3x3 patches
NUM_PATCHES = (IMAGE_SIZE // PATCH) ** 2   # 144 image patches
PATCH_DIM = 3 * PATCH * PATCH              # of 27 pixel values
NUM_TOKENS = NUM_PATCHES + 1               # + the all-zero dummy patch (§3): 145 tokens
DIM, HEADS = 192, 3                        # §3.1: embedding size 192, 3 heads of 64
ENCODER_DEPTH, DECODER_DEPTH = 12, 4       # §3.1
MLP_RATIO, DROPOUT = 2, 0.1                # §3.1: MLP 192 -> 384 -> 192, dropout 0.1
MEAN, STD = 0.5, 0.5                       # Tables 1-2: colour normalization
# Eq. 1 is the loss and Eq. 2 the lr rule, as displayed (§3.2-§3.3's text swaps them). Each entry below has a flag.
PRETRAIN = dict(epochs=4000, warmup_epochs=400, batch_size=1408,   # §3.2, Table 1
                base_lr=1.5e-4,            # lr = base_lr * batch_size / 256 (Eq. 2)
                weight_decay=0.05, crop_scale=(0.6, 1.0),   # AdamW; random resized crop, then flip p = 0.5
                mask_ratio=0.75, alpha=0.1,   # §2: 75% of the patches masked; Eq. 1's discount of the visible ones
                layer_decay=1.0)           # not in Table 1: 1.0, no layer-wise decay (one make_optimizer for both)
FINETUNE = dict(epochs=300, warmup_epochs=20, batch_size=768,      # §3.3, Table 2
                base_lr=1e-3, weight_decay=0.05, crop_scale=(0.8, 1.0),   # AutoAugment (CIFAR-10 policy), crop, flip
                layer_decay=0.75)          # layer-wise lr decay, after ELECTRA [17]
# Table 2 has no mixup, CutMix, label smoothing, drop path or gradient clipping (MAE fine-tunes with the first four).
# Not in the tables: the data folder, the cosine's floor (§5 suggests ~20% of the peak; the paper's runs had none),
# epochs between checkpoints (Figure 5's epochs 20, 1020, ... are multiples of 20), the one seed of every run (§3).
COMMON = dict(data_dir="./data", min_lr=0.0, save_every=20, seed=0)
RECIPES = {"pretrain": PRETRAIN, "finetune": FINETUNE, "eval": dict(batch_size=1000), "bench": {}}   # eval: max batch
CLASSES, DATASETS = {"cifar10": 10, "cifar100": 100}, ["cifar10", "cifar100", "cifar10+cifar100"]   # merged: §5

# ==== The model: §2, §3.1, Figures 1-2 ================================================================================
def patchify(images):
    """(B, 3, 36, 36) -> (B, 144, 27): 3x3 patches in row-major order, each flattened as (channel, row, column)."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // PATCH, PATCH, W // PATCH, PATCH)       # (B, 3, 12, 3, 12, 3)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * PATCH * PATCH)  # (B, 12, 12, 3, 3, 3) -> (B, 144, 27)

def unpatchify(patches):
    """(B, 144, 27) -> (B, 3, 36, 36), patchify's inverse, as §2.3 reshapes the output into the image (F.fold)."""
    return F.fold(patches.transpose(1, 2), IMAGE_SIZE, PATCH, stride=PATCH)

class Block(nn.Module):
    """One transformer layer (§3.1, Figure 2): self-attention, then an MLP 192 -> 384 -> 192 with ReLU; every linear
    layer in it has a bias. Pre-norm is a choice (the paper does not place the LayerNorms): ViT and MAE put one before
    each sublayer, and the LayerNorm that ends the encoder (§2.1) is what such a stack needs."""
    def __init__(self, dim=DIM, heads=HEADS, mlp_ratio=MLP_RATIO, dropout=DROPOUT):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2, self.fc1 = nn.LayerNorm(dim), nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)
        nn.init.xavier_uniform_(self.qkv.weight)    # §3.1's PyTorch defaults, as nn.MultiheadAttention sets them: the
        nn.init.zeros_(self.qkv.bias)               # paper's module, as Table 3's 0.26 G MACs show (MAC counters skip
        nn.init.zeros_(self.proj.bias)              # it; all layers count 0.62 G); proj.weight keeps nn.Linear's

    def forward(self, x):                                            # (B, N, 192)
        B, N, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(attention(q, k, v).transpose(1, 2).reshape(B, N, D))  # q, k, v (B, 3, N, 64); see Speed
        # §3.1: dropout "to the output of these [two linear] layers", after fc1's ReLU and fc2; none on attention
        h = F.dropout(F.relu(self.fc1(self.norm2(x))), self.dropout, self.training)   # (B, N, 384)
        return x + F.dropout(self.fc2(h), self.dropout, self.training)             # (B, N, 192)

def random_masking(noise, mask_ratio):
    """§2: mask `mask_ratio` of each image's 144 patches, uniformly, without replacement: those with the smallest
    (B, 144) uniform `noise` stay visible. The dummy, the classification token, is never masked (a choice). Returns
    keep (B, 37): the tokens the encoder sees, the dummy's index 144 last; restore (B, 144): puts [visible, masked]
    back in image order; mask (B, 144): 1 = masked."""
    num_keep = int(NUM_PATCHES * (1 - mask_ratio))                   # 36 for 0.75
    shuffle = noise.argsort(1)                                       # a random permutation
    restore = shuffle.argsort(1)
    mask = (restore >= num_keep).float()                             # the shuffle's first 36 stay
    dummy_index = torch.full((noise.shape[0], 1), NUM_PATCHES, device=noise.device, dtype=shuffle.dtype)
    return torch.cat([shuffle[:, :num_keep], dummy_index], 1), restore, mask

class Encoder(nn.Module):
    """§2.1, Figure 2: bias-free patch embedding + 145 learnable positions, 12 blocks, LayerNorm,
    bias-free projection; it sees the kept patches and the dummy (pre-training) or all 145."""
    def __init__(self, depth=ENCODER_DEPTH):
        super().__init__()
        self.patch_embed = nn.Linear(PATCH_DIM, DIM, bias=False)     # §3.1: no bias outside transformer layers
        self.pos_embed = nn.Parameter(torch.randn(NUM_TOKENS, DIM))  # §2.1: learnable; N(0, 1), nn.Embedding's
        self.blocks = nn.Sequential(*(Block() for _ in range(depth)))
        self.norm, self.proj = nn.LayerNorm(DIM), nn.Linear(DIM, DIM, bias=False)

    def forward(self, patches, keep=None):                           # (B, 144, 27)
        dummy = patches.new_zeros(patches.shape[0], 1, PATCH_DIM)   # §3: the all-zero 145th patch
        x = self.patch_embed(torch.cat([patches, dummy], 1))        # (B, 145, 192)
        # A numerics choice: positions join in the embedding's dtype, so under bf16 autocast the residual stream is
        # bf16 (LayerNorm still computes in fp32); MAE and timm add fp32 positions, which keep it fp32.
        x = x + self.pos_embed.to(x.dtype)
        if keep is not None:                                         # pre-training: drop the masked
            x = x.gather(1, keep[:, :, None].expand(-1, -1, DIM))   # (B, 37, 192)
        return self.proj(self.norm(self.blocks(x)))                  # (B, 37 or 145, 192)

class Decoder(nn.Module):
    """§2.2: the encoded visible tokens and a shared learnable mask token at each masked position, in image order, + its
    own 145 positions; 4 blocks (dropout: §3.1); LayerNorm; a bias-free projection to a patch's 27 pixels (§2.3)."""
    def __init__(self, depth=DECODER_DEPTH):
        super().__init__()
        self.mask_token = nn.Parameter(torch.randn(DIM))             # N(0, 1) as the positions (MAE: N(0, 0.02^2))
        self.pos_embed = nn.Parameter(torch.randn(NUM_TOKENS, DIM))  # §2.2: the decoder's own positions
        self.blocks = nn.Sequential(*(Block() for _ in range(depth)))
        self.norm, self.proj = nn.LayerNorm(DIM), nn.Linear(DIM, PATCH_DIM, bias=False)

    def forward(self, encoded, restore):                             # (B, 37, 192), (B, 144)
        visible, dummy = encoded[:, :-1], encoded[:, -1:]
        B, num_keep, D = visible.shape
        masked = self.mask_token.to(visible.dtype).expand(B, NUM_PATCHES - num_keep, D)  # dtype: as Encoder
        x = torch.cat([visible, masked], 1)                          # (B, 144, 192), shuffled
        x = x.gather(1, restore[:, :, None].expand(-1, -1, D))       # (B, 144, 192), image order
        x = torch.cat([x, dummy], 1) + self.pos_embed.to(x.dtype)   # (B, 145, 192)
        return self.proj(self.norm(self.blocks(x)))[:, :NUM_PATCHES] # (B, 144, 27): the dummy is no patch

class MAE(nn.Module):
    """Pre-training (Figure 1): normalized images (B, 3, 36, 36) -> Eq. 1's loss, the predicted
    patches (B, 144, 27), the mask (B, 144), chosen by `noise` (B, 144), drawn unless given."""
    def __init__(self, mask_ratio=PRETRAIN["mask_ratio"], alpha=PRETRAIN["alpha"]):
        super().__init__()
        self.mask_ratio, self.alpha = mask_ratio, alpha
        self.encoder, self.decoder = Encoder(), Decoder()

    def forward(self, images, noise=None):
        target = patchify(images)                                    # (B, 144, 27)
        noise = torch.rand(images.shape[0], NUM_PATCHES, device=images.device) if noise is None else noise
        keep, restore, mask = random_masking(noise, self.mask_ratio)
        pred = self.decoder(self.encoder(target, keep), restore)
        return mae_loss(pred, target, mask, self.alpha), pred, mask

class Classifier(nn.Module):
    """Fine-tuning (§3.3): the encoder + a linear layer on the dummy's embedding."""
    def __init__(self, num_classes):
        super().__init__()   # the head keeps its bias: §3.1's bias-free projections are the encoder's and decoder's
        self.encoder, self.head = Encoder(), nn.Linear(DIM, num_classes)

    def forward(self, images):                                       # (B, 3, 36, 36)
        return self.head(self.encoder(patchify(images))[:, -1])    # (B, classes)

def count_parameters(model):
    return sum(p.numel() for p in model.parameters())

# ==== The loss (Eq. 1) and the schedules: Eq. 2, warm-up + cosine (§3.2, §3.3), layer-wise decay (§3.3) ===============
def mae_loss(pred, target, mask, alpha):
    """Eq. 1: MSE_masked_patches + alpha * MSE_unmasked_patches on pixels normalized as in Tables 1-2 (not per patch,
    as MAE can); pred, target (B, 144, 27), mask (B, 144), 1 = masked. The decoder's first outputs have a mean square
    of 1/3 (LayerNorm, then 192 weights of variance 1/576): Eq. 1 starts near (1 + alpha)(1/3 + mean target^2), 0.65
    on CIFAR-10 (Figure 3: 0.63)."""
    per_patch = ((pred.float() - target) ** 2).mean(-1)             # (B, 144)
    mse_masked = (per_patch * mask).sum() / mask.sum()
    mse_unmasked = (per_patch * (1 - mask)).sum() / (1 - mask).sum()
    return mse_masked + alpha * mse_unmasked

def peak_lr(base_lr, batch_size):
    return base_lr * batch_size / 256                                # Eq. 2, the linear scaling rule

def learning_rate(step, peak, warmup_steps, total_steps, min_lr):
    """A pure function of the iteration (a choice: the paper counts epochs). Phase 1: linear warm-up from 0 to `peak`.
    Phase 2: cosine decay from `peak` to `min_lr` at `total_steps`."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))

def layer_id(name):
    """Layer-wise decay's layer (§3.3): patch embedding and positions 0, block i ("encoder.blocks.i.fc1.weight")
    i + 1, all after the last block (final LayerNorm and projection, head; the decoder) 13."""
    if name.startswith(("encoder.patch_embed", "encoder.pos_embed")):
        return 0
    return int(name.split(".")[2]) + 1 if name.startswith("encoder.blocks.") else ENCODER_DEPTH + 1

def param_groups(model, weight_decay, layer_decay):
    """AdamW's groups, lr_scale = layer_decay ** (13 - layer). Weight decay on linear layers' weight matrices only:
    biases, LayerNorms, positions and the mask token are exempt (the paper is silent; as MAE and timm do)."""
    decayed, groups = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}, {}
    for name, p in model.named_parameters():
        layer, decay = layer_id(name), id(p) in decayed
        group = groups.setdefault((layer, decay), dict(params=[], weight_decay=weight_decay if decay else 0.0,
                                                       lr_scale=layer_decay ** (ENCODER_DEPTH + 1 - layer)))
        group["params"].append(p)
    return list(groups.values())

def make_optimizer(model, weight_decay, layer_decay, device):
    """AdamW (Tables 1-2) with PyTorch's default betas (0.9, 0.999), as the paper gives none
    (MAE pre-trains with 0.95); fused on the GPU. The lr is set at every step."""
    return torch.optim.AdamW(param_groups(model, weight_decay, layer_decay), lr=0.0, fused=device.type == "cuda")

# ==== Data and augmentation: §3, Tables 1-2 ===========================================================================
def load_cifar(dataset, root, split):
    """uint8 images (N, 3, 32, 32) and labels (N,) of a split ("train" or "test"), read by torchvision, which checks
    each file's md5 and downloads what is missing or corrupt; "cifar10+cifar100" concatenates the two."""
    images, labels = [], []
    for name in dataset.split("+"):
        kind = getattr(torchvision.datasets, name.upper())          # CIFAR10 or CIFAR100
        try:                                                         # a missing or corrupt file is downloaded
            data = kind(root, train=split == "train", download=True)
        except Exception as e:                                       # offline, or the download failed
            folder, check = os.path.join(root, kind.base_folder), torchvision.datasets.cifar.check_integrity
            files = [*kind.train_list, *kind.test_list, (kind.meta["filename"], kind.meta["md5"])]
            bad = [f for f, md5 in files if not check(os.path.join(folder, f), md5)]
            raise UsageError(f"{name}: {', '.join(bad) or 'a file'} missing or corrupt in {folder}, and the download "
                             f"failed ({type(e).__name__}); put the CIFAR batches there or run once online") from None
        images.append(torch.from_numpy(data.data).permute(0, 3, 1, 2))   # (N, 32, 32, 3) -> (N, 3, 32, 32)
        labels.append(torch.tensor(data.targets))
    return torch.cat(images).contiguous(), torch.cat(labels)

def normalize(images):
    return (images.float() / 255 - MEAN) / STD                       # uint8 -> float32 (Tables 1-2)

def crop_boxes(batch, H, W, scale, ratio=(3 / 4, 4 / 3), device="cpu"):
    """torchvision's RandomResizedCrop.get_params (its aspect ratios: the paper gives none) and RandomHorizontalFlip,
    for a whole batch at once on the device (torchvision draws per image). top, left, h, w, flip, each (B,)."""
    area = H * W * torch.empty(batch, 10, device=device).uniform_(*scale)  # as torchvision: 10 tries per image
    log_ratio = torch.empty(batch, 10, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    w, h = (area * log_ratio.exp()).sqrt().round(), (area / log_ratio.exp()).sqrt().round()   # (B, 10)
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first, none = fits.int().argmax(1, keepdim=True), ~fits.any(1)   # the first try that fits; where none fits, the
    w, h = torch.where(none, W, w.gather(1, first)[:, 0]), torch.where(none, H, h.gather(1, first)[:, 0])  # whole image
    top = (torch.rand(batch, device=device) * (H - h + 1)).floor()   # randint(0, H - h + 1)
    left = (torch.rand(batch, device=device) * (W - w + 1)).floor()
    return top, left, h, w, torch.rand(batch, device=device) < 0.5

def crop_resize(images, top, left, h, w, flip, size=IMAGE_SIZE):
    """Each image cropped to its box, resized (bilinear) and flipped where asked in one grid_sample: resized_crop
    + hflip, pixel for pixel (roi_align blends in pixels from outside a box's edges, and cannot flip)."""
    B, _, H, W = images.shape
    k = torch.arange(size, device=images.device) + 0.5   # output pixel centres; their sources (half-pixel rule)
    xs = (left[:, None] + k * (w / size)[:, None] - 0.5).clamp(left[:, None], (left + w - 1)[:, None])  # in the box
    ys = (top[:, None] + k * (h / size)[:, None] - 0.5).clamp(top[:, None], (top + h - 1)[:, None])
    xs = torch.where(flip[:, None], xs.flip(1), xs)                        # (B, size); a flip reverses them
    xs, ys = (2 * xs + 1) / W - 1, (2 * ys + 1) / H - 1                    # pixels -> [-1, 1]
    grid = torch.stack([xs[:, None, :].expand(B, size, size), ys[:, :, None].expand(B, size, size)], -1)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)

def crop_flip_normalize(images, scale):
    """On the device: a random resized crop of `scale` (Tables 1-2), 32 -> 36 in one interpolation (a choice), flip."""
    return normalize(crop_resize(images, *crop_boxes(len(images), *images.shape[2:], scale, device=images.device)))

def resize_test(images):                         # test images: a plain bilinear 32 -> 36, no augmentation
    return F.interpolate(images.float(), size=IMAGE_SIZE, mode="bilinear", align_corners=False)

class AutoAugmented(torch.utils.data.Dataset):
    """Table 2's AutoAugment, CIFAR-10 policy (on CIFAR-100 too, §3.3), per image in DataLoader workers, on the
    32x32 image before the device's crop and flip (the paper gives no order; this keeps the CPU's share small).
    Items are (index, seed): an image's draws depend on its seed only, so resuming changes nothing."""
    def __init__(self, images, labels):
        self.images, self.labels, self.policy = images, labels, T.AutoAugment(T.AutoAugmentPolicy.CIFAR10)

    def __getitem__(self, item):
        with torch.random.fork_rng(devices=[]):                    # leaves the caller's RNG alone
            torch.default_generator.manual_seed(item[1])
            return TF.pil_to_tensor(self.policy(TF.to_pil_image(self.images[item[0]]))), self.labels[item[0]]

def epoch_order(n, seed, epoch):                 # an epoch's data order, from its own seed: one per (run, epoch)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))

def run_batches(n, batch_size, seed, epochs, first=(0, 0)):
    """Fine-tuning's batches of (index, AutoAugment seed), full ones only, from `first` = (epoch, batch) to the run's
    end: one DataLoader serves the whole run, so its workers start once."""
    for epoch in range(first[0], epochs):
        order, base = epoch_order(n, seed, epoch).tolist(), (seed * 1_000_003 + epoch) * n % 2 ** 62  # < 2^63
        for b in range(first[1] if epoch == first[0] else 0, n // batch_size):
            yield [(order[i], base + i) for i in range(b * batch_size, (b + 1) * batch_size)]

def autoaugment_loader(images, labels, batches, num_workers, pin_memory):
    return torch.utils.data.DataLoader(   # its own generator: its seed draw must not move the global RNG
        AutoAugmented(images, labels), batch_sampler=batches, num_workers=num_workers, pin_memory=pin_memory,
        prefetch_factor=4 if num_workers else None, worker_init_fn=ignore_stop_signals, generator=torch.Generator())

def ignore_stop_signals(worker_id):       # Ctrl-C and SIGTERM often reach the whole process group
    for s in StopRequest.SIGNALS:
        signal.signal(s, signal.SIG_IGN)

# ==== The training loop of both stages (they differ in data, loss and lr groups) ======================================
def autocast(args):                       # bf16 where --amp is on; weights, AdamW states and the loss stay fp32
    return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.amp)

def train_step(opt, step_loss, batch, lr, args):
    """One AdamW step at learning rate `lr`; the loss is returned still on the device (no host sync)."""
    for g in opt.param_groups:
        g["lr"] = lr * g["lr_scale"]                                 # §3.3's layer-wise decay
    with autocast(args):
        loss = step_loss(batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()

class StopRequest:
    """While active, Ctrl-C or SIGTERM only sets `requested`: the loop saves and exits; a second one acts at once."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.requested, self.previous = None, {s: signal.signal(s, self.handler) for s in self.SIGNALS}
        return self

    def handler(self, signum, frame):              # os.write: print() is not reentrant
        self.requested = signum
        signal.signal(signum, self.previous[signum])
        os.write(2, f"{signal.Signals(signum).name}: saving a checkpoint (send it again to quit at once)\n".encode())

    def exit(self, args, step, epochs_done):       # once the checkpoint is saved
        print(f"interrupted ({signal.Signals(self.requested).name}) after step {step} ({epochs_done} epochs done); "
              f"checkpoint saved. Resume with: python mae_vit.py --stage {args.stage} --out {args.out} --resume")
        raise SystemExit(128 + self.requested)      # 130 for Ctrl-C, 143 for SIGTERM

    def __exit__(self, *exc):
        for s, previous in self.previous.items():
            signal.signal(s, previous)

def note(text):
    print(f"note: {text}", file=sys.stderr, flush=True)

def train(args, model, step_loss, batches, steps, resume, evaluate=lambda epoch: {}):
    """The loop of both stages. step_loss(batch) runs the (compiled) model; batches(epoch, start) yields an epoch's
    batches from batch `start`; evaluate(epoch) returns the metrics to log; `resume` is a checkpoint or None."""
    device, path = torch.device(args.device), os.path.join(args.out, "checkpoint.pth")
    opt = make_optimizer(model, args.weight_decay, args.layer_decay, device)
    peak, total, warmup = peak_lr(args.base_lr, args.batch_size), args.epochs * steps, args.warmup_epochs * steps
    print(f"parameters: {count_parameters(model):,} (encoder {count_parameters(model.encoder):,})", flush=True)
    own = (f"mask ratio {args.mask_ratio:g}, alpha {args.alpha:g}" if args.stage == "pretrain"
           else f"layer decay {args.layer_decay:g}")
    print(f"recipe: epochs {args.epochs} (warm-up {args.warmup_epochs}), batch {args.batch_size} ({steps} steps per "
          f"epoch), peak lr {peak:.3g} (Eq. 2: {args.base_lr:g} x {args.batch_size} / 256), weight decay "
          f"{args.weight_decay:g}, {own}; {args.device}{', compiled' * args.compile}{', bf16' * args.amp}", flush=True)
    if args.warmup_epochs >= args.epochs:
        note(f"the warm-up ({args.warmup_epochs} epochs) is not shorter than the run ({args.epochs}), so the lr never "
             f"reaches its peak; set --warmup-epochs")
    first_epoch, start, loss = 0, 0, None             # start: the batch an epoch starts at (a resumed one: mid-way)
    if resume:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        first_epoch, start = resume["epoch"], resume["batch"]
        torch.set_rng_state(resume["rng_cpu"])
        torch.cuda.set_rng_state_all(resume["rng_cuda"])       # [] on the CPU; applied lazily, only if CUDA runs

    def save(epoch, batch):                      # everything an exact resume needs
        state = dict(stage=args.stage, model=model.state_dict(), optimizer=opt.state_dict(), epoch=epoch, batch=batch,
                     step=epoch * steps + batch, args=vars(args), rng_cpu=torch.get_rng_state(),
                     rng_cuda=torch.cuda.get_rng_state_all() if device.type == "cuda" else [])
        replace_file(path, lambda tmp: torch.save(state, tmp))
    model.train()
    times = [time.time()]                          # the first epoch's start, then each epoch's end
    with StopRequest() as stop:
        for epoch in range(first_epoch, args.epochs):
            t0 = time.time()
            loss_sum = torch.zeros((), device=device)        # summed on the device: no host sync per step
            bad_step = torch.full((), -1, device=device)     # the first step whose loss is not finite
            for b, batch in enumerate(batches(epoch, start), start):
                step = epoch * steps + b
                lr = learning_rate(step, peak, warmup, total, args.min_lr)
                loss_b = train_step(opt, step_loss, batch, lr, args)
                loss_sum += loss_b
                bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss_b), step, bad_step)
                if stop.requested:
                    break
            done, start = b + 1 - start, 0               # batches run in this epoch; the next epoch starts at 0
            loss = loss_sum.item() / done                # the epoch's one host sync
            if not math.isfinite(loss):
                kept = f"the last good checkpoint is {path}" if os.path.exists(path) else "no checkpoint"
                raise SystemExit(f"error: non-finite loss at epoch {epoch + 1}, step {int(bad_step) + 1}; stopped "
                                 f"without saving ({kept})")
            if b + 1 < steps:                            # a stop request, mid-epoch: save there and exit
                save(epoch, b + 1)
                stop.exit(args, epoch * steps + b + 1, epoch)
            seconds = time.time() - t0
            images_per_s = done * args.batch_size / seconds              # training only, no evaluation
            metrics = evaluate(epoch + 1)                # {"accuracy": ...} on the test split; pre-training's k-NN
            model.train()
            times.append(time.time())   # ETA: the mean epoch after this process's first (it compiles; may be partial)
            per_epoch = (times[-1] - times[1]) / (len(times) - 2) if len(times) > 2 else times[1] - times[0]
            left = args.epochs - epoch - 1
            eta = ("ETA after the next epoch" if len(times) == 2 and args.compile and left
                   else f"ETA {datetime.timedelta(seconds=int(left * per_epoch))}")
            shown = "".join(f" | {key.replace('_', ' ')} {100 * value:.2f}%" for key, value in metrics.items())
            append_line(os.path.join(args.out, "metrics.jsonl"), {"epoch": epoch + 1, "loss": loss, "lr": lr,
                        "accuracy": None, **metrics, "images_per_s": images_per_s, "seconds": seconds})  # in every row
            print(f"epoch {epoch + 1}/{args.epochs} | loss {loss:.4f} | lr {lr:.2e}{shown} | {images_per_s:,.0f} img/s "
                  f"| {seconds:.1f} s | {eta}", flush=True)
            if stop.requested or (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs:
                save(epoch + 1, 0)
            if stop.requested:
                stop.exit(args, (epoch + 1) * steps, epoch + 1)
    return loss

# ==== Evaluation: top-1 accuracy (Table 3), reconstructions (Figures 4-5), k-NN accuracy (not in the paper) ===========
def eval_batches(images, limit):
    """(start, batch): uint8 images resized, normalized, in batches of the largest divisor of N <= limit (one shape)."""
    bs = max(d for d in range(1, min(len(images), limit) + 1) if len(images) % d == 0)
    return ((i, normalize(resize_test(images[i:i + bs]))) for i in range(0, len(images), bs))

@torch.no_grad()
def accuracy_on(model, images, labels, args):
    """Top-1 accuracy on uint8 test images (N, 3, 32, 32) already on the device."""
    model.eval()
    with autocast(args):
        predicted = torch.cat([model(x).argmax(1) for _, x in eval_batches(images, args.batch_size)])
    return int((predicted == labels).sum()) / len(images)

@torch.no_grad()
def save_reconstructions(mae, images, noise, paths, args):
    """Figure 4: original | masked (grey) | reconstruction (the decoder's whole output), two triplets a row."""
    mae.eval()
    x = normalize(resize_test(images))
    with autocast(args):
        _, pred, mask = mae(x, noise)
    masked = unpatchify(patchify(x) * (1 - mask[:, :, None]))              # masked -> 0: grey
    triplets = torch.stack([x, masked, unpatchify(pred.float())], 1).flatten(0, 1) * STD + MEAN
    for path in paths:
        replace_file(path, lambda tmp: torchvision.utils.save_image(triplets, tmp, format="png", nrow=6, padding=2))

@torch.no_grad()
def knn_accuracy(encoder, train_images, train_labels, test_images, test_labels, k=20, temperature=0.07, limit=1000):
    """Not in the paper (its one signal in pre-training is the loss): the frozen encoder's top-1 accuracy by Wu et
    al.'s weighted k-NN (2018), as in DINO. Feature: the L2-normalized encoder output at the dummy token (the head's
    input) of an unaugmented, unmasked image; a test image's k most similar training images vote exp(cosine / T)."""
    encoder.eval()                               # bank: the training images' features, queries: the test images'
    bank, queries = (torch.cat([F.normalize(encoder(patchify(x))[:, -1].float(), dim=1)              # (N, 192)
                                for _, x in eval_batches(images, limit)]) for images in (train_images, test_images))
    votes = torch.zeros(len(queries), int(train_labels.max()) + 1, device=bank.device)     # (test images, classes)
    for i in range(0, len(queries), limit):      # a chunk of test images at a time: never all of (test x train)
        with torch.autocast(bank.device.type, enabled=False):                  # similarities in fp32
            similarity, nearest = (queries[i:i + limit] @ bank.T).topk(min(k, len(bank)), dim=1)     # (b, k)
        votes[i:i + limit].scatter_add_(1, train_labels[nearest], (similarity / temperature).exp())
    return int((votes.argmax(1) == test_labels).sum()) / len(test_labels)   # a tie goes to the lower class

def knn_splits(dataset, root):
    """k-NN's labelled splits: train images, labels, test images, labels of the dataset (merged: CIFAR-10's)."""
    name = dataset.split("+")[0]
    return (*load_cifar(name, root, "train"), *load_cifar(name, root, "test"))

def snapshot_epochs(epochs, save_every):
    """The checkpoints nearest 0, 1/10, ..., 1 of a run, whose reconstructions are kept: Figure 5's evolution."""
    saved = sorted({*range(save_every, epochs + 1, save_every), epochs})
    return {min(saved, key=lambda c: abs(c - j * epochs / 10)) for j in range(11)}

# ==== Checkpoints and logs: plain values (weights_only=True), written so a kill or full disk keeps the last copy ======
RUN_ARGS = ("stage", "dataset", "batch_size", "base_lr", "weight_decay", "min_lr", "warmup_epochs", "mask_ratio",
            "alpha", "layer_decay", "crop_scale", "seed", "init")           # fixed for a run
CHECKPOINT_KEYS = {"stage", "model", "optimizer", "epoch", "batch", "step", "args", "rng_cpu", "rng_cuda"}

def replace_file(path, write):
    """write(tmp), then rename tmp over path (atomic); on failure, one line, exit 1, path unchanged."""
    try:
        write(path + ".tmp")
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:   # on a full disk torch.save raises RuntimeError
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        write_failed(path, e)

def append_line(path, row):                      # one JSON line at the end of metrics.jsonl
    try:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as e:
        write_failed(path, e)

def write_failed(path, e):
    why = getattr(e, "strerror", None) or f"{type(e).__name__}; is the disk full?"
    raise SystemExit(f"error: could not write {path} ({why}); stopped, the files written before are unchanged")

def load_checkpoint(path, stage=None):
    """One of our checkpoints: the keys resume and eval read, then a strict load into a meta model (no memory)."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path} {'is a folder' if os.path.isdir(path) else 'does not exist'}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"{path} is not a checkpoint this program can read ({type(e).__name__})") from None
    args = ckpt.get("args") if isinstance(ckpt, dict) else None
    if (not isinstance(args, dict) or not CHECKPOINT_KEYS <= ckpt.keys() or not isinstance(ckpt["model"], dict)
            or not {"stage", "dataset", "epochs", "data_dir"} <= args.keys() or args["stage"] != ckpt["stage"]
            or args["dataset"] not in (CLASSES if ckpt["stage"] == "finetune" else DATASETS)
            or not all(isinstance(ckpt[k], int) for k in ("epoch", "batch", "step"))):
        raise UsageError(f"{path} is not a mae_vit checkpoint")
    if stage and ckpt["stage"] != stage:
        raise UsageError(f"{path} is a {ckpt['stage']} checkpoint, not a {stage} one (a run goes on with --resume)")
    with torch.device("meta"):
        model = MAE() if ckpt["stage"] == "pretrain" else Classifier(CLASSES[args["dataset"]])
    try:                                       # meta copies: the checkpoint's tensors stay as they are
        model.load_state_dict({k: v.to("meta") if torch.is_tensor(v) else v for k, v in ckpt["model"].items()})
    except RuntimeError as e:
        why = "; ".join(line.strip() for line in str(e).splitlines()[1:])
        raise UsageError(f"{path} does not match this architecture ({why})") from None
    return ckpt

# ==== Stages ==========================================================================================================
def setup_device(args):
    if torch.device(args.device).type == "cuda":
        torch.set_float32_matmul_precision("high")     # a choice: TF32 products in fp32 (--no-amp) runs
        if hasattr(torch.backends.cuda, "enable_cudnn_sdp"):   # cuDNN attention has been wrong at lengths that are
            torch.backends.cuda.enable_cudnn_sdp(False)        # not multiples of 128, as 37 and 145 are
    return torch.device(args.device)

def maybe_compile(model, args):
    return torch.compile(model, dynamic=False) if args.compile else model

def pretrain(args, resume):
    """§3.2, Table 1. The uint8 training set lives on the device, where batches, crops, flips and masks are drawn."""
    device = setup_device(args)
    knn = [t.to(device) for t in knn_splits(args.dataset, args.data_dir)]    # its train images: the training set,
    images = knn[0] if "+" not in args.dataset else load_cifar(args.dataset, args.data_dir, "train")[0].to(device)
    steps = prepare_out(args, resume, len(images))                          # read and held once (merged: apart)
    model = MAE(args.mask_ratio, args.alpha).to(device)
    compiled, encoder = maybe_compile(model, args), maybe_compile(model.encoder, args)   # training; k-NN
    noise = torch.rand(8, NUM_PATCHES, generator=torch.Generator().manual_seed(args.seed)).to(device)  # eval's first 8

    def evaluate(epoch):                 # at checkpoints; it draws no random number, so a resumed run stays exact
        if epoch % args.save_every == 0 or epoch == args.epochs:
            names = ["reconstructions.png"] + ([f"reconstructions-epoch{epoch:04d}.png"]   # a copy at the tenths
                                               if epoch in snapshot_epochs(args.epochs, args.save_every) else [])
            save_reconstructions(model, knn[2][:8], noise, [os.path.join(args.out, n) for n in names], args)  # 8 test
        if args.knn_every and (epoch % args.knn_every == 0 or epoch == args.epochs):
            with autocast(args):
                return dict(knn_accuracy=knn_accuracy(encoder, *knn, limit=args.batch_size))
        return {}

    def batches(epoch, start):           # (B, 3, 32, 32) uint8, picked on the device
        order = epoch_order(len(images), args.seed, epoch).to(device)
        return (images[order[b * args.batch_size:(b + 1) * args.batch_size]] for b in range(start, steps))
    step_loss = lambda x: compiled(crop_flip_normalize(x, args.crop_scale))[0]
    loss = train(args, model, step_loss, batches, steps, resume, evaluate)
    log = map(json.loads, open(os.path.join(args.out, "metrics.jsonl")))     # a resumed run's earlier epochs too
    knn_logged = [row["knn_accuracy"] for row in log if row.get("knn_accuracy") is not None]
    return dict(final_loss=loss, knn_accuracy=knn_logged[-1] if knn_logged else None)

def finetune(args, resume):
    """§3.3, Table 2: the encoder (pre-trained, from --init; else from scratch) + a linear head."""
    device, model = setup_device(args), Classifier(CLASSES[args.dataset])
    if args.init and not resume:
        init = load_checkpoint(args.init, "pretrain")["model"]          # its encoder; the decoder is left behind
        model.encoder.load_state_dict({k.split(".", 1)[1]: v for k, v in init.items() if k.startswith("encoder.")})
    images, labels = load_cifar(args.dataset, args.data_dir, "train")
    test_images, test_labels = load_cifar(args.dataset, args.data_dir, "test")
    steps = prepare_out(args, resume, len(images))
    model, test_images, test_labels = model.to(device), test_images.to(device), test_labels.to(device)
    compiled = maybe_compile(model, args)
    first = (resume["epoch"], resume["batch"]) if resume else (0, 0)
    index_batches = run_batches(len(images), args.batch_size, args.seed, args.epochs, first)
    stream = iter(autoaugment_loader(images, labels, index_batches, args.num_workers, device.type == "cuda"))
    batches = lambda epoch, start: ((x.to(device, non_blocking=True), y.to(device, non_blocking=True))   # the stream's
                                    for x, y in (next(stream) for _ in range(start, steps)))          # next batches
    step_loss = lambda b: F.cross_entropy(compiled(crop_flip_normalize(b[0], args.crop_scale)), b[1])
    loss = train(args, model, step_loss, batches, steps, resume,
                 lambda epoch: dict(accuracy=accuracy_on(compiled, test_images, test_labels, args)))
    rows = [json.loads(line) for line in open(os.path.join(args.out, "metrics.jsonl"))]   # a resumed run's too
    best = max(rows, key=lambda row: row["accuracy"])     # §4.2: CIFAR-100 overfits after ~50 epochs
    print(f"best test accuracy {100 * best['accuracy']:.2f}% at epoch {best['epoch']} (chosen on the test split, so "
          f"optimistic; the last epoch's: {100 * rows[-1]['accuracy']:.2f}%)")
    return dict(final_loss=loss, test_accuracy=rows[-1]["accuracy"], best_test_accuracy=best["accuracy"],
                best_epoch=best["epoch"])

def eval_stage(args, checkpoint):
    """A classifier's top-1 accuracy; or an MAE's Eq. 1 (masks from the run's seed), k-NN accuracy and Figure 4."""
    device, classifier = setup_device(args), checkpoint["stage"] == "finetune"
    model = Classifier(CLASSES[args.dataset]) if classifier else MAE(args.mask_ratio, args.alpha)
    model.load_state_dict(checkpoint["model"])
    images, labels = load_cifar(args.dataset, args.data_dir, "test")
    knn = [] if classifier else knn_splits(args.dataset, args.data_dir)
    prepare_out(args, None)
    model, images, labels, knn = model.to(device), images.to(device), labels.to(device), [t.to(device) for t in knn]
    compiled, result = maybe_compile(model, args).eval(), dict(checkpoint_stage=checkpoint["stage"])
    if classifier:
        result["test_accuracy"] = accuracy_on(compiled, images, labels, args)
        print(f"test accuracy: {100 * result['test_accuracy']:.2f}%")
    else:
        noise = torch.rand(len(images), NUM_PATCHES, generator=torch.Generator().manual_seed(args.seed)).to(device)
        with torch.no_grad(), autocast(args):
            losses = [float(compiled(x, noise[i:i + len(x)])[0]) * len(x)
                      for i, x in eval_batches(images, args.batch_size)]
            knn_acc = knn_accuracy(maybe_compile(model.encoder, args), *knn, limit=args.batch_size)
        result.update(test_loss=sum(losses) / len(images), knn_accuracy=knn_acc,
                      reconstructions=os.path.join(args.out, "reconstructions.png"))
        print(f"test reconstruction loss (Eq. 1): {result['test_loss']:.4f}, k-NN accuracy {knn_acc:.2%}")
        save_reconstructions(model, images[:8], noise[:8], [result["reconstructions"]], args)
    append_line(os.path.join(args.out, "metrics.jsonl"), result)
    return result

# ==== Speed only: attention kernels and --stage bench; the math is the same (a GPU test checks the kernels) ===========
# FlexAttention at 145 tokens, its tiles the fastest on an H200 with torch 2.11 (flash's 128-query tiles: 145 -> 256)
FLEX_TILES = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_M1=32, BLOCK_N1=64, BLOCK_M2=64, BLOCK_N2=32)
flex_attention = None
if torch.__version__ >= "2.11":          # a TorchVersion: compared as a version, not as text
    from torch.nn.attention.flex_attention import flex_attention

def attention(q, k, v):
    """softmax(q k^T / sqrt(64)) v, (B, heads, N, 64). bf16 on the GPU: 37 tokens (pre-training's encoder) to the
    memory-efficient kernel, 145 when compiled to FlexAttention; all else is PyTorch's choice."""
    if q.is_cuda and q.dtype != torch.float32:
        if q.shape[2] <= 64:
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
                return F.scaled_dot_product_attention(q, k, v)
        if flex_attention is not None and torch.compiler.is_compiling():
            return flex_attention(q, k, v, kernel_options=FLEX_TILES)
    return F.scaled_dot_product_attention(q, k, v)

def bench(args, _):
    """On synthetic data: img/s of both training steps and of AutoAugment, projected; true MACs; loss against fp32."""
    from torch.utils.flop_counter import FlopCounterMode
    device, counters, train_images = setup_device(args), torch._dynamo.utils.counters, 50_000   # a CIFAR training set
    cuda, timed = device.type == "cuda", 50 if device.type == "cuda" else 5
    sync = torch.cuda.synchronize if cuda else lambda: None
    torch._dynamo.reset()

    def seconds(run, warmup, repeats):           # per call, after `warmup` calls
        for i in range(warmup + repeats):
            if i == warmup:
                sync()
                t0 = time.perf_counter()
            run()
        sync()
        return (time.perf_counter() - t0) / repeats
    pre_bs, fine_bs = (args.batch_size or (recipe["batch_size"] if cuda else 128) for recipe in (PRETRAIN, FINETUNE))
    pool = torch.randint(0, 256, (4 * pre_bs, 3, 32, 32), dtype=torch.uint8, device=device)
    x, y, noise = pool[:fine_bs], torch.randint(0, 10, (fine_bs,), device=device), torch.rand(pre_bs, NUM_PATCHES)
    stages = {  # model, batch size, the loss of its training step, a loss on one fixed batch and mask
        "pretrain": (MAE().to(device), pre_bs, lambda m: m(crop_flip_normalize(pool[torch.randint(
                     0, len(pool), (pre_bs,), device=device)], PRETRAIN["crop_scale"]))[0],
                     lambda m: m(normalize(resize_test(pool[:pre_bs])), noise.to(device))[0]),
        "finetune": (Classifier(10).to(device), fine_bs, lambda m: F.cross_entropy(m(crop_flip_normalize(
                     x, FINETUNE["crop_scale"])), y), lambda m: F.cross_entropy(m(normalize(resize_test(x))), y))}
    ips, loss_rel_diff, graphs, precision = {}, {}, 0, torch.get_float32_matmul_precision()
    for stage, (model, bs, train_loss, fixed_loss) in stages.items():
        counters.clear()                                                   # training graphs only
        recipe, compiled = RECIPES[stage], maybe_compile(model, args)
        opt = make_optimizer(model, recipe["weight_decay"], recipe["layer_decay"], device)
        step = lambda: train_step(opt, lambda _: train_loss(compiled), None, 1e-4, args)
        ips[stage] = bs / seconds(step, 2 if args.compile else 1, timed)     # the first calls compile
        graphs += counters["stats"]["unique_graphs"]
        with torch.no_grad(), autocast(args):                              # in eval mode: no dropout
            fast = fixed_loss(compiled.eval()).float()
        torch.set_float32_matmul_precision("highest")
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            exact = fixed_loss(model)
        torch.set_float32_matmul_precision(precision)
        loss_rel_diff[stage] = float((fast - exact).abs() / exact)
    encoder, labels = maybe_compile(stages["pretrain"][0].encoder, args), pool[:, 0, 0, 0].long() % 10
    with autocast(args):                         # k-NN at a checkpoint encodes the training and the test set
        knn_seconds = seconds(lambda: knn_accuracy(encoder, pool, labels, pool[:pre_bs], labels[:pre_bs], limit=pre_bs),
                              1, 1) * (train_images + 10_000) / (len(pool) + pre_bs)
    skipped, counted = 2 * max(1, args.num_workers), 128 if cuda else 12    # not timed: the workers' start
    fake = torch.randint(0, 256, ((skipped + counted) * fine_bs, 3, 32, 32), dtype=torch.uint8)
    loaded = iter(autoaugment_loader(fake, torch.zeros(len(fake)), run_batches(len(fake), fine_bs, 0, 1),
                                     args.num_workers, cuda))
    loader_ips = fine_bs / seconds(lambda: next(loaded), skipped, counted)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        stages["finetune"][0](torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE, device=device))
    fine_ips = min(ips["finetune"], loader_ips)       # the two run side by side
    epoch = dict(pretrain=train_images / ips["pretrain"], finetune=train_images / fine_ips)   # seconds per epoch
    return dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__, compile=args.compile,
                amp=args.amp, parameters=count_parameters(stages["finetune"][0]),
                macs_per_image=counter.get_total_flops() / 2, pretrain_batch=pre_bs, finetune_batch=fine_bs,
                pretrain_img_per_s=ips["pretrain"], finetune_step_img_per_s=ips["finetune"],
                finetune_loader_img_per_s=loader_ips, finetune_img_per_s=fine_ips, compiled_graphs=graphs,
                loss_rel_diff_vs_fp32=loss_rel_diff, knn_seconds_per_checkpoint=knn_seconds,
                knn_share_of_pretraining=knn_seconds / (knn_seconds + COMMON["save_every"] * epoch["pretrain"]),
                projected_recipe_hours=sum(RECIPES[s]["epochs"] * epoch[s] for s in epoch) / 3600)

# ==== Command line: each flag once, with its help, the check its value must pass, and the stages that read it =========
class UsageError(Exception):            # bad input: one line on stderr, exit code 2, nothing written (main)
    pass

def finite(text):                      # argparse type of the real-valued flags: nan and inf are refused at once
    if not math.isfinite(value := float(text)):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value

POSITIVE = (lambda v: v > 0, "{f} must be positive, got {v}")
NOT_NEGATIVE = (lambda v: v >= 0, "{f} must not be negative, got {v}")
NOT_EMPTY = (lambda v: v != "", "{f} is empty")               # e.g. --init "$CKPT" with CKPT unset
# Stages p(retrain), f(inetune), e(val), b(ench): a recipe flag a stage never reads is refused, not silently ignored.
FLAGS = [  # flag, argparse keywords (the defaults of the recipes are added to the help), check, stages that read it
    ("--stage", dict(required=True, choices=list(RECIPES), help="pretrain: Table 1, finetune: Table 2"), None, None),
    ("--dataset", dict(choices=DATASETS, help="cifar10+cifar100: §5's merged pre-training"), None, "pfe"),
    ("--data-dir", dict(help="holds cifar-10-batches-py/, cifar-100-python/"), NOT_EMPTY, None),
    ("--out", dict(help="output folder (default runs/<stage>-<dataset>)"), NOT_EMPTY, None),
    ("--epochs", dict(type=int, help="total epochs; a resumed run may extend them"), POSITIVE, "pf"),
    ("--warmup-epochs", dict(type=int, help="epochs of linear warm-up"), NOT_NEGATIVE, "pf"),
    ("--batch-size", dict(type=int, help="Eq. 2 scales the lr with it; eval: the largest batch"), POSITIVE, None),
    ("--base-lr", dict(type=finite, help="Eq. 2: lr = base lr x batch size / 256"), POSITIVE, "pf"),
    ("--weight-decay", dict(type=finite, help="AdamW's"), NOT_NEGATIVE, "pf"),
    ("--min-lr", dict(type=finite, help="the cosine's floor; §5 suggests ~20%% of the peak lr"), NOT_NEGATIVE, "pf"),
    ("--mask-ratio", dict(type=finite, help="§2: the share of the 144 patches masked"),
     (lambda v: 0 < v < 1 and NUM_PATCHES * (1 - v) >= 1, "{f} {v} must be in (0, 1) and leave a patch visible"), "pe"),
    ("--alpha", dict(type=finite, help="Eq. 1's discount of the visible patches"), NOT_NEGATIVE, "pe"),
    ("--layer-decay", dict(type=finite, help="§3.3"), (lambda v: 0 < v <= 1, "{f} must be in (0, 1], got {v}"), "pf"),
    ("--crop-scale", dict(type=finite, nargs=2, metavar=("MIN", "MAX"), help="the random resized crop's area range"),
     (lambda v: 0 < v[0] <= v[1] <= 1, "{f} must be MIN MAX in (0, 1], MIN <= MAX, got {v}"), "pf"),
    ("--init", dict(help="finetune: a pretrain checkpoint (else from scratch); eval: the checkpoint"), NOT_EMPTY, None),
    ("--resume", dict(action="store_true", help="continue the run in --out from its checkpoint.pth"), None, None),
    ("--save-every", dict(type=int, help="epochs between checkpoints, and one at the end"), POSITIVE, "pf"),
    ("--knn-every", dict(type=int, help="k-NN every N epochs; 0: never (default: --save-every)"), NOT_NEGATIVE, "p"),
    ("--device", dict(default="cuda" if torch.cuda.is_available() else "cpu", help="cuda where available"),
     (lambda v: re.fullmatch(r"cpu|cuda(:\d+)?", v), "{f} {v} is not a device name; it runs on cpu or cuda"), None),
    ("--compile", dict(action=argparse.BooleanOptionalAction, help="torch.compile (default: on cuda)"), None, None),
    ("--amp", dict(action=argparse.BooleanOptionalAction, help="bf16 autocast (default: on cuda)"), None, None),
    ("--seed", dict(type=int, help="§3's one seed"), (lambda v: 0 <= v < 2 ** 32, "{f} must be in [0, 2^32), got {v}"),
     None),
    ("--num-workers", dict(type=int, default=min(16, os.cpu_count() or 1), help="loader workers"), NOT_NEGATIVE, None)]

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.error = lambda message: p.exit(2, f"error: {message}\n")     # one line, exit 2
    for name, keywords, *_ in FLAGS:          # --help shows the recipes' values, the defaults
        key = name[2:].replace("-", "_")
        defaults = ", ".join(f"{stage} {r[key]}".strip() for stage, r in {**RECIPES, "": COMMON}.items() if key in r)
        p.add_argument(name, **dict(keywords, help=keywords["help"] + (f" (default: {defaults})" if defaults else "")))
    args = p.parse_args(argv)
    args.crop_scale = args.crop_scale and tuple(args.crop_scale)   # a tuple: --resume compares it with the run's
    return args

def resolve(args):
    """Check the flags, fill in the rest (a resumed run's, the recipes'), check all before any write; -> checkpoint."""
    checkpoint = load_checkpoint(args.init) if args.stage == "eval" and args.init else None
    classifier = checkpoint is not None and checkpoint["stage"] == "finetune"
    for name, _, check, reads in FLAGS:
        value = getattr(args, name[2:].replace("-", "_"))
        if value is not None and check and not check[0](value):
            raise UsageError(check[1].format(f=name, v=value))
        if value is not None and reads and (args.stage[0] not in reads or (classifier and "f" not in reads)):
            where = "eval of a finetune checkpoint" if classifier else f"--stage {args.stage}"
            raise UsageError(f"{name} has no effect on {where}; drop it")
    run = {}                                     # what this run takes from the checkpoint's, where no flag is given
    if args.resume:
        if args.stage not in ("pretrain", "finetune") or args.out is None:
            raise UsageError("--resume continues the pretrain or finetune run in --out DIR")
        checkpoint = load_checkpoint(os.path.join(args.out, "checkpoint.pth"))
        kept = (*RUN_ARGS, "epochs", "data_dir", "save_every", "knn_every")   # fixed, and those that may change
        run = {k: v for k, v in checkpoint["args"].items() if k in kept}       # (older runs saved no crop_scale)
        for key in [k for k in RUN_ARGS if k in run and getattr(args, k) not in (None, run[k])]:   # changed: refused
            raise UsageError(f"--{key.replace('_', '-')} {getattr(args, key)} conflicts with the run in {args.out} ("
                             f"{run[key]}); on --resume, only --epochs, --save-every, --knn-every, --data-dir change")
    elif checkpoint:                             # eval: the run's data and seed (its masks), and an MAE's Eq. 1
        run = {k: v for k, v in checkpoint["args"].items() if k in "dataset data_dir seed mask_ratio alpha".split()}
    for key, value in {**COMMON, **RECIPES[args.stage], **run}.items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    args.knn_every = args.save_every if args.knn_every is None else args.knn_every
    if args.resume and args.epochs == checkpoint["epoch"] and not checkpoint["batch"]:
        note(f"the run in {args.out} has done all its {args.epochs} epochs; nothing to train (a larger --epochs "
             f"extends it)")
    if args.out is None and args.stage != "bench":
        args.out = os.path.join("runs", f"{'eval-' + checkpoint['stage'] if checkpoint else args.stage}-{args.dataset}")
    device = torch.device(args.device)
    gpus = torch.cuda.device_count() if device.type == "cuda" and torch.cuda.is_available() else 0
    classes = checkpoint["model"]["head.weight"].shape[0] if classifier else 0
    peak = peak_lr(args.base_lr, args.batch_size) if args.base_lr and args.batch_size else math.inf
    begun = checkpoint["epoch"] + (1 if checkpoint["batch"] else 0) if args.resume else 0   # a started epoch counts
    for bad, message in [
        (args.stage == "eval" and not args.init, "--stage eval needs --init CHECKPOINT"),
        (args.init and args.stage in ("pretrain", "bench"), "--init is for finetune and eval (pretraining resumes)"),
        (args.out and args.stage == "bench", "--stage bench writes no files (it prints its result); drop --out"),
        (not args.dataset and args.stage != "bench", f"--stage {args.stage} needs --dataset ({', '.join(DATASETS)})"),
        (args.stage == "finetune" and args.dataset not in CLASSES, "fine-tuning needs --dataset cifar10 or cifar100"),
        (classes and CLASSES.get(args.dataset) != classes,
         f"{args.init} classifies {classes} classes; {args.dataset} does not have {classes}"),
        (device.type == "cuda" and (device.index or 0) >= gpus,
         f"--device {args.device}: this machine has {gpus} CUDA device(s)"),
        (args.resume and args.epochs < begun, f"--epochs {args.epochs} is fewer than the {begun} already begun"),
        (args.min_lr > peak, f"--min-lr {args.min_lr} is above the peak lr {peak}")]:
        if bad:
            raise UsageError(message)
    # GPU defaults: Triton (torch.compile) needs compute capability 7.0, fast bf16 8.0; eval's one pass is not compiled
    capability = torch.cuda.get_device_capability(args.device) if device.type == "cuda" else (0, 0)
    args.compile = capability >= (7, 0) and args.stage != "eval" if args.compile is None else args.compile
    args.amp = capability >= (8, 0) if args.amp is None else args.amp
    return checkpoint

def prepare_out(args, resume, num_images=None):
    """The checks that need the data or --out, then --out itself; returns the (full) batches per epoch."""
    if num_images is not None and num_images < args.batch_size:
        raise UsageError(f"--batch-size {args.batch_size} is larger than the {num_images} training images")
    steps = num_images and num_images // args.batch_size          # fixed shapes: the last partial batch goes
    if resume and (resume["batch"] >= steps or resume["step"] != resume["epoch"] * steps + resume["batch"]):
        raise UsageError(f"{args.data_dir} holds {num_images} training images ({steps} batches per epoch), not the set "
                         f"the run in {args.out} trained on; resume it with its own --data-dir")
    log = os.path.join(args.out, "metrics.jsonl")
    taken = [f for f in ("checkpoint.pth", "metrics.jsonl") if os.path.exists(os.path.join(args.out, f))]
    if taken and not resume:
        raise UsageError(f"--out {args.out} already holds a run ({', '.join(taken)}); " + (
            "choose another --out" if args.stage == "eval" else "use --resume to continue it or choose another --out"
            if "checkpoint.pth" in taken else "it has no checkpoint to resume, so choose another --out"))
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {args.out} cannot be created ({e.strerror})") from None
    if not os.access(args.out, os.W_OK):
        raise UsageError(f"--out {args.out} is not writable")
    lines, kept = open(log).readlines() if resume and os.path.exists(log) else [], []
    for n, line in enumerate(lines, 1):      # (a torn last line, with no newline, goes too)
        try:
            kept += [line] if line.endswith("\n") and int(json.loads(line)["epoch"]) <= resume["epoch"] else []
        except (ValueError, KeyError, TypeError):
            raise UsageError(f"line {n} of {log} is not an epoch's record; remove or fix it to resume") from None
    if len(kept) < len(lines):
        replace_file(log, lambda tmp: pathlib.Path(tmp).write_text("".join(kept)))
        note(f"{len(lines) - len(kept)} line(s) of {log} after epoch {resume['epoch']}, the checkpoint's, are dropped: "
             f"those epochs run again")
    return steps

def main(argv=None):
    args = parse_args(argv)
    try:
        checkpoint = resolve(args)
        torch.manual_seed(args.seed)
        result = dict(pretrain=pretrain, finetune=finetune, eval=eval_stage, bench=bench)[args.stage](args, checkpoint)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError:           # e.g. Table 2's batch of 768 on a small GPU
        resumable = args.stage != "bench" and os.path.exists(os.path.join(args.out, "checkpoint.pth"))  # fixed batch
        print(f"error: {args.device} ran out of memory at batch size {args.batch_size or 'default'}; " + (
            "its checkpoint is kept: resume it where more GPU memory is free, or start a new --out with a smaller "
            "--batch-size" if resumable else "a smaller --batch-size needs less (Eq. 2 scales the lr with it)"),
            file=sys.stderr)
        return 1
    paths = args.out and dict(out=args.out, metrics=os.path.join(args.out, "metrics.jsonl"), checkpoint=os.path.join(
        args.out, "checkpoint.pth") if args.stage in ("pretrain", "finetune") else None)
    print(json.dumps(dict(stage=args.stage, dataset=args.dataset, epochs=args.epochs, **result, **(paths or {}))))
    return 0

if __name__ == "__main__":
    sys.exit(main())
