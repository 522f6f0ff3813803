"""Every KD method against a transcription of its authors' official code: values and gradients.

Each ``ref_*`` function below restates, in this file's own code, the formula as the cited official
implementation computes it (its constants, normalisations, reductions, which side is detached,
and the training loop's weights), in float64. kdrun's method runs on the same random inputs in
float32; the loss values and the gradients with respect to the student's inputs (logits or
features, and the method's trainable adapters where it has some) must agree.

References (read, not copied):
  RepDistiller  github.com/HobbitLong/RepDistiller            distiller_zoo/*.py, crd/*.py, models/util.py,
                                                              train_student.py, helper/loops.py
  mdistiller    github.com/megvii-research/mdistiller         mdistiller/distillers/*.py, engine/cfg.py
  DIST          github.com/hunto/DIST_KD                      segmentation/losses/dist_kd.py (relations); with tau:
                github.com/huawei-noah/Efficient-Computing    Distillation/VanillaKD/losses/dist.py (tau, tau^2)
  LS-KD         github.com/sunshangquan/logit-standardization-KD   mdistiller/distillers/KD.py
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from kdrun.losses import LOSSES, Outputs, StepContext

D = torch.float64


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------- harness


def leaf(*shape, scale=1.0):
    """A float32 leaf requiring grad, and its detached float64 twin requiring grad."""
    x = (torch.randn(*shape) * scale).requires_grad_()
    return x, x.detach().to(D).requires_grad_()


def ctx_for(y, index=None, epoch=0, epochs=240, num_samples=0):
    y = torch.as_tensor(y)
    index = torch.arange(len(y)) if index is None else torch.as_tensor(index)
    return StepContext(y, index, epoch, epochs, num_samples)


def built(name, t_shapes, s_shapes, num_samples=64, t_names=None, s_names=None, **kw):
    t_names = t_names or [f"stage{i + 1}" for i in range(len(t_shapes))]
    s_names = s_names or [f"stage{i + 1}" for i in range(len(s_shapes))]
    m = LOSSES.get(name)(layers={"teacher": t_names, "student": s_names}, **kw)
    m.build([torch.Size(s) for s in t_shapes], [torch.Size(s) for s in s_shapes], num_samples)
    return m


def total_loss(m, s_logits, t_logits, y, s_feats=(), t_feats=(), ctx=None):
    """What kdrun's student stage minimises: ce_weight * CE + the method's terms."""
    ctx = ctx or ctx_for(y)
    terms = m(Outputs(s_logits, list(s_feats)), Outputs(t_logits, list(t_feats)), ctx)
    return m.ce_weight * F.cross_entropy(s_logits, torch.as_tensor(y)) + sum(terms.values())


def agree(got, want, pairs, rel=1e-4, atol=1e-6):
    """got (float32) == want (float64) and d/d(each pair) agree."""
    assert got.item() == pytest.approx(want.item(), rel=rel, abs=atol)
    xs32, xs64 = zip(*pairs)
    g32 = torch.autograd.grad(got, xs32, allow_unused=True)
    g64 = torch.autograd.grad(want, xs64, allow_unused=True)
    for a, b in zip(g32, g64):
        assert a is not None and b is not None
        torch.testing.assert_close(a.to(D), b, rtol=1e-3, atol=1e-6 + 1e-4 * b.abs().max().item())
        assert b.abs().max() > 0  # the gradient is not trivially zero


def p64(module_param):
    """An adapter's parameter as a float64 leaf (the reference uses the same weights)."""
    return module_param.detach().to(D).requires_grad_()


# ---------------------------------------------------------------- KD


def ref_distill_kl(y_s, y_t, T):
    # RepDistiller distiller_zoo/KD.py DistillKL: kl_div(log_softmax(s/T), softmax(t/T), sum) * T^2 / batch
    p_s = F.log_softmax(y_s / T, dim=1)
    p_t = F.softmax(y_t / T, dim=1)
    return F.kl_div(p_s, p_t, reduction="sum") * T**2 / y_s.shape[0]


def test_kd_equals_repdistiller():
    # RepDistiller scripts/run_cifar_distill.sh kd: -r 0.1 -a 0.9 (train_student.py: gamma*CE + alpha*KD), T = 4
    s, s64 = leaf(8, 100, scale=3)
    t, t64 = leaf(8, 100, scale=3)
    y = torch.randint(0, 100, (8,))
    m = LOSSES.get("kd")(temperature=4.0, alpha=0.9)
    want = 0.1 * F.cross_entropy(s64, y) + 0.9 * ref_distill_kl(s64, t64.detach(), 4.0)
    agree(total_loss(m, s, t, y), want, [(s, s64)])


# ---------------------------------------------------------------- DKD


def ref_dkd(logits_student, logits_teacher, target, alpha, beta, temperature):
    # mdistiller distillers/DKD.py dkd_loss: binary (gt, rest) masses by masking the softmax; the non-target
    # distribution by subtracting 1000 from the gt logit (after /T); KL with size_average=False * T^2 / batch
    gt = torch.zeros_like(logits_student).scatter_(1, target[:, None], 1).bool()
    other = ~gt

    def cat_mask(p):
        return torch.cat([(p * gt).sum(1, keepdim=True), (p * other).sum(1, keepdim=True)], dim=1)

    p_s = cat_mask(F.softmax(logits_student / temperature, dim=1))
    p_t = cat_mask(F.softmax(logits_teacher / temperature, dim=1))
    tckd = F.kl_div(torch.log(p_s), p_t, reduction="sum") * temperature**2 / target.shape[0]
    p_t2 = F.softmax(logits_teacher / temperature - 1000.0 * gt, dim=1)
    log_p_s2 = F.log_softmax(logits_student / temperature - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_p_s2, p_t2, reduction="sum") * temperature**2 / target.shape[0]
    return alpha * tckd + beta * nckd


@pytest.mark.parametrize("epoch_1based, beta", [(1, 8.0), (7, 2.0), (20, 6.0), (150, 8.0)])
def test_dkd_equals_mdistiller(epoch_1based, beta):
    # mdistiller DKD.forward_train: CE_WEIGHT * CE + min(epoch / WARMUP, 1) * dkd_loss, epoch 1-based;
    # cfg.py CFG.DKD: CE_WEIGHT 1, ALPHA 1, BETA 8 (per-pair 2/6 in configs/cifar100/dkd), T 4, WARMUP 20
    s, s64 = leaf(8, 100, scale=3)
    t, t64 = leaf(8, 100, scale=3)
    y = torch.randint(0, 100, (8,))
    m = LOSSES.get("dkd")(alpha=1.0, beta=beta, temperature=4.0, warmup=20, ce_weight=1.0)
    ramp = min(epoch_1based / 20, 1.0)
    want = F.cross_entropy(s64, y) + ramp * ref_dkd(s64, t64.detach(), y, 1.0, beta, 4.0)
    got = total_loss(m, s, t, y, ctx=ctx_for(y, epoch=epoch_1based - 1))  # kdrun's epochs are 0-based
    agree(got, want, [(s, s64)])


# ---------------------------------------------------------------- DIST


def ref_dist(z_s, z_t, beta, gamma, tau):
    # DIST_KD segmentation/losses/dist_kd.py and, with tau, Efficient-Computing VanillaKD/losses/dist.py:
    # softmax(z / tau); Pearson = cosine of mean-centred rows
    # (eps 1e-8 in the denominator); inter over samples, intra over classes (transpose); each times tau^2
    def pearson(a, b, eps=1e-8):
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)

    y_s, y_t = (z_s / tau).softmax(1), (z_t / tau).softmax(1)
    inter = tau**2 * (1 - pearson(y_s, y_t).mean())
    intra = tau**2 * (1 - pearson(y_s.T, y_t.T).mean())
    return beta * inter + gamma * intra


def test_dist_equals_authors_code():
    # CIFAR-100 setting (configs/loss/dist.yaml): beta 2, gamma 2, tau 4, CE weight 1
    s, s64 = leaf(16, 100, scale=3)
    t, t64 = leaf(16, 100, scale=3)
    y = torch.randint(0, 100, (16,))
    m = LOSSES.get("dist")(beta=2.0, gamma=2.0, tau=4.0)
    want = F.cross_entropy(s64, y) + ref_dist(s64, t64.detach(), 2.0, 2.0, 4.0)
    agree(total_loss(m, s, t, y), want, [(s, s64)])


# ---------------------------------------------------------------- LS-KD


def ref_ls_kd(logits_student, logits_teacher, temperature):
    # logit-standardization-KD mdistiller/distillers/KD.py: normalize = (z - mean) / (1e-7 + std) (torch.std:
    # Bessel-corrected), then kl_div(log_softmax, softmax, reduction="none").sum(1).mean() * T^2
    def normalize(z):
        return (z - z.mean(-1, keepdim=True)) / (1e-7 + z.std(-1, keepdim=True))

    log_p_s = F.log_softmax(normalize(logits_student) / temperature, dim=1)
    p_t = F.softmax(normalize(logits_teacher) / temperature, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="none").sum(1).mean() * temperature**2


def test_ls_kd_equals_authors_code():
    # their CIFAR-100 runs: --logit-stand --base-temp 2 --kd-weight 9 with CE_WEIGHT 0.1 (cfg.py CFG.KD)
    s, s64 = leaf(8, 100, scale=3)
    t, t64 = leaf(8, 100, scale=5)
    y = torch.randint(0, 100, (8,))
    m = LOSSES.get("ls_kd")(temperature=2.0, weight=9.0, ce_weight=0.1)
    want = 0.1 * F.cross_entropy(s64, y) + 9.0 * ref_ls_kd(s64, t64.detach(), 2.0)
    agree(total_loss(m, s, t, y), want, [(s, s64)])


# ---------------------------------------------------------------- FitNet


def ref_conv_reg(x, weight, bias, bn_weight, bn_bias, eps):
    # RepDistiller models/util.py / mdistiller _common.py ConvReg (equal H, W): Conv2d kernel (1+0)x(1+0) with
    # bias -> BatchNorm2d (training mode: batch statistics, biased variance) -> ReLU (use_relu=True)
    x = F.conv2d(x, weight, bias)
    x = F.batch_norm(x, None, None, bn_weight, bn_bias, training=True, eps=eps)
    return F.relu(x)


def test_fitnet_equals_repdistiller_hint_with_convreg():
    # RepDistiller --distill hint -a 0 -b 100: CE + 100 * MSELoss(ConvReg(f_s), f_t) (mean over elements)
    fs, fs64 = leaf(6, 16, 8, 8)
    ft, ft64 = leaf(6, 32, 8, 8)
    s, s64 = leaf(6, 10)
    y = torch.randint(0, 10, (6,))
    m = built("fitnet", [ft.shape], [fs.shape], weight=100.0)
    conv, bn, _ = m.adapters[0]
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    w64, g64, b64 = p64(conv.weight), p64(bn.weight), p64(bn.bias)
    conv_bias = torch.randn(32, dtype=D)  # ConvReg has a conv bias: BN in training mode cancels it
    hint = ref_conv_reg(fs64, w64, conv_bias, g64, b64, bn.eps)
    want = F.cross_entropy(s64, y) + 100.0 * F.mse_loss(hint, ft64.detach())
    got = total_loss(m, s, s.detach(), y, [fs], [ft])
    agree(got, want, [(fs, fs64), (conv.weight, w64), (bn.weight, g64), (bn.bias, b64), (s, s64)])


# ---------------------------------------------------------------- AT


def ref_at(g_s, g_t, p=2):
    # RepDistiller distiller_zoo/AT.py: pool the larger (square) map to the other's H; attention
    # normalize(f.pow(p).mean(1).view(B, -1)); per pair (at(f_s) - at(f_t)).pow(2).mean(); a list, summed
    def at(f):
        return F.normalize(f.pow(p).mean(1).view(f.size(0), -1))

    losses = []
    for f_s, f_t in zip(g_s, g_t):
        s_h, t_h = f_s.shape[2], f_t.shape[2]
        if s_h > t_h:
            f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
        elif s_h < t_h:
            f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
        losses.append((at(f_s) - at(f_t)).pow(2).mean())
    return sum(losses)


def test_at_equals_repdistiller():
    # --distill attention -a 0 -b 1000, g_s = feat_s[1:-1] (every stage); channel counts and sizes may differ
    pairs = [leaf(4, 16, 16, 16), leaf(4, 32, 8, 8), leaf(4, 64, 4, 4)]
    teach = [leaf(4, 32, 8, 8), leaf(4, 64, 8, 8), leaf(4, 128, 4, 4)]
    m = built("at", [t.shape for t, _ in teach], [s.shape for s, _ in pairs], weight=1000.0)
    got = m(
        Outputs(torch.zeros(4, 5), [s for s, _ in pairs]),
        Outputs(torch.zeros(4, 5), [t for t, _ in teach]),
        ctx_for([0, 1, 2, 3]),
    )["at"]
    want = 1000.0 * ref_at([s for _, s in pairs], [t.detach() for _, t in teach])
    agree(got, want, pairs)


# ---------------------------------------------------------------- NST


def ref_nst(g_s, g_t):
    # RepDistiller distiller_zoo/NST.py: pool to the smaller H; view(B, C, -1), normalize(dim=2);
    # poly_kernel(a, b) = ((a.unsqueeze(1) * b.unsqueeze(2)).sum(-1)) ** 2; full loss
    # k(t, t).mean().detach() + k(s, s).mean() - 2 k(s, t).mean(); a list, summed
    def poly(a, b):
        return (a.unsqueeze(1) * b.unsqueeze(2)).sum(-1).pow(2)

    total = 0
    for f_s, f_t in zip(g_s, g_t):
        s_h, t_h = f_s.shape[2], f_t.shape[2]
        if s_h > t_h:
            f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
        elif s_h < t_h:
            f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
        f_s = F.normalize(f_s.view(f_s.shape[0], f_s.shape[1], -1), dim=2)
        f_t = F.normalize(f_t.view(f_t.shape[0], f_t.shape[1], -1), dim=2)
        total = total + poly(f_t, f_t).mean().detach() + poly(f_s, f_s).mean() - 2 * poly(f_s, f_t).mean()
    return total


def test_nst_equals_repdistiller():
    # --distill nst -a 0 -b 50, g_s = feat_s[1:-1]
    pairs = [leaf(4, 8, 8, 8), leaf(4, 16, 4, 4)]
    teach = [leaf(4, 12, 4, 4), leaf(4, 24, 4, 4)]
    m = built("nst", [t.shape for t, _ in teach], [s.shape for s, _ in pairs], weight=50.0)
    got = m(
        Outputs(torch.zeros(4, 5), [s for s, _ in pairs]),
        Outputs(torch.zeros(4, 5), [t for t, _ in teach]),
        ctx_for([0, 1, 2, 3]),
    )["nst"]
    want = 50.0 * ref_nst([s for _, s in pairs], [t.detach() for _, t in teach])
    agree(got, want, pairs)


# ---------------------------------------------------------------- RKD


def ref_rkd(f_s, f_t, w_d=25.0, w_a=50.0):
    # RepDistiller distiller_zoo/RKD.py RKDLoss: pdist via |e|^2 + |e|^2 - 2 e e^T clamped at 1e-12, sqrt,
    # diagonal zeroed; distances / mean of the positive ones (teacher under no_grad); smooth_l1 (mean);
    # angles: normalize(e_j - e_i) pairwise, bmm, view(-1); smooth_l1 (mean); w_d * dist + w_a * angle
    def pdist(e, eps=1e-12):
        sq = e.pow(2).sum(1)
        res = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt().clone()
        res[range(len(e)), range(len(e))] = 0
        return res

    student, teacher = f_s.view(f_s.shape[0], -1), f_t.view(f_t.shape[0], -1)
    with torch.no_grad():
        t_d = pdist(teacher)
        t_d = t_d / t_d[t_d > 0].mean()
    d = pdist(student)
    d = d / d[d > 0].mean()
    loss_d = F.smooth_l1_loss(d, t_d)
    with torch.no_grad():
        td = F.normalize(teacher.unsqueeze(0) - teacher.unsqueeze(1), p=2, dim=2)
        t_angle = torch.bmm(td, td.transpose(1, 2)).view(-1)
    sd = F.normalize(student.unsqueeze(0) - student.unsqueeze(1), p=2, dim=2)
    s_angle = torch.bmm(sd, sd.transpose(1, 2)).view(-1)
    return w_d * loss_d + w_a * F.smooth_l1_loss(s_angle, t_angle)


def test_rkd_equals_repdistiller():
    # --distill rkd -a 0 -b 1 on feat[-1] (pre_logits)
    fs, fs64 = leaf(8, 32)
    ft, ft64 = leaf(8, 64, scale=2)
    m = built("rkd", [ft.shape], [fs.shape], t_names=["pre_logits"], s_names=["pre_logits"])
    got = m(Outputs(torch.zeros(8, 5), [fs]), Outputs(torch.zeros(8, 5), [ft]), ctx_for([0] * 8))["rkd"]
    agree(got, 1.0 * ref_rkd(fs64, ft64.detach()), [(fs, fs64)])


# ---------------------------------------------------------------- SP


def ref_sp(f_s, f_t):
    # RepDistiller distiller_zoo/SP.py Similarity: G = f f^T of the flattened maps, F.normalize (rows, p=2),
    # (G_t - G_s)^2 summed / bsz^2
    bsz = f_s.shape[0]
    g_s = F.normalize(torch.mm(f_s.view(bsz, -1), f_s.view(bsz, -1).t()))
    g_t = F.normalize(torch.mm(f_t.view(bsz, -1), f_t.view(bsz, -1).t()))
    return ((g_t - g_s) * (g_t - g_s)).view(-1, 1).sum(0)[0] / (bsz * bsz)


def test_sp_equals_repdistiller():
    # --distill similarity -a 0 -b 3000 on [feat[-2]] (the last stage's map)
    fs, fs64 = leaf(8, 16, 4, 4)
    ft, ft64 = leaf(8, 32, 4, 4)
    m = built("sp", [ft.shape], [fs.shape], weight=3000.0)
    got = m(Outputs(torch.zeros(8, 5), [fs]), Outputs(torch.zeros(8, 5), [ft]), ctx_for([0] * 8))["sp"]
    agree(got, 3000.0 * ref_sp(fs64, ft64.detach()), [(fs, fs64)])


# ---------------------------------------------------------------- PKT


def ref_pkt(output_net, target_net, eps=1e-7):
    # RepDistiller distiller_zoo/PKT.py cosine_similarity_loss: x / (||x|| + eps) (NaN -> 0), cosine
    # similarities scaled to [0, 1] by (c + 1) / 2, rows normalised to sum 1, mean(p_t * log((p_t + eps) / (p_s + eps)))
    def probs(x):
        x = x / (torch.sqrt(torch.sum(x**2, dim=1, keepdim=True)) + eps)
        sim = (torch.mm(x, x.t()) + 1.0) / 2.0
        return sim / torch.sum(sim, dim=1, keepdim=True)

    p_s, p_t = probs(output_net), probs(target_net)
    return torch.mean(p_t * torch.log((p_t + eps) / (p_s + eps)))


def test_pkt_equals_repdistiller():
    # --distill pkt -a 0 -b 30000 on feat[-1]
    fs, fs64 = leaf(8, 32)
    ft, ft64 = leaf(8, 64)
    m = built("pkt", [ft.shape], [fs.shape], t_names=["pre_logits"], s_names=["pre_logits"], weight=30000.0)
    got = m(Outputs(torch.zeros(8, 5), [fs]), Outputs(torch.zeros(8, 5), [ft]), ctx_for([0] * 8))["pkt"]
    agree(got, 30000.0 * ref_pkt(fs64, ft64.detach()), [(fs, fs64)])


# ---------------------------------------------------------------- CC


def ref_cc(f_s, f_t):
    # RepDistiller distiller_zoo/CC.py Correlation (the authors' code): delta = |f_s - f_t|,
    # mean over i of sum_k delta[i-1, k] * delta[i, k]; f_s, f_t from LinearEmbed (flatten + Linear with bias)
    delta = torch.abs(f_s - f_t)
    return torch.mean((delta[:-1] * delta[1:]).sum(1))


def test_cc_equals_repdistiller():
    # --distill correlation -a 0 -b 0.02, feat_dim 128, embed_s / embed_t = LinearEmbed on feat[-1]; both train
    fs, fs64 = leaf(8, 32)
    ft, ft64 = leaf(8, 64)
    m = built("cc", [ft.shape], [fs.shape], t_names=["pre_logits"], s_names=["pre_logits"], weight=0.02)
    es, et = m.adapters[0].linear, m.embed_t[0].linear
    ws, bs, wt, bt = p64(es.weight), p64(es.bias), p64(et.weight), p64(et.bias)
    got = m(Outputs(torch.zeros(8, 5), [fs]), Outputs(torch.zeros(8, 5), [ft]), ctx_for([0] * 8))["cc"]
    want = 0.02 * ref_cc(F.linear(fs64, ws, bs), F.linear(ft64.detach(), wt, bt))
    agree(got, want, [(fs, fs64), (es.weight, ws), (es.bias, bs), (et.weight, wt), (et.bias, bt)])


# ---------------------------------------------------------------- CRD


class RefContrast:
    """RepDistiller crd/memory.py ContrastMemory + crd/criterion.py ContrastLoss, with given contrast_idx."""

    def __init__(self, memory_v1, memory_v2, K, T, momentum):
        self.memory_v1, self.memory_v2 = memory_v1.clone(), memory_v2.clone()  # v1: student, v2: teacher
        self.K, self.T, self.momentum, self.Z_v1, self.Z_v2 = K, T, momentum, -1.0, -1.0

    def scores(self, v1, v2, y, idx):
        n_data = self.memory_v1.shape[0]
        w1 = self.memory_v1[idx.view(-1)].view(len(v1), self.K + 1, -1)
        out_v2 = torch.exp(torch.bmm(w1, v2.unsqueeze(2)) / self.T)  # teacher anchor vs the student memory
        w2 = self.memory_v2[idx.view(-1)].view(len(v1), self.K + 1, -1)
        out_v1 = torch.exp(torch.bmm(w2, v1.unsqueeze(2)) / self.T)  # student anchor vs the teacher memory
        if self.Z_v1 < 0:
            self.Z_v1 = (out_v1.mean() * n_data).item()  # set once, a constant
        if self.Z_v2 < 0:
            self.Z_v2 = (out_v2.mean() * n_data).item()
        with torch.no_grad():
            for mem, v in ((self.memory_v1, v1), (self.memory_v2, v2)):
                pos = mem[y] * self.momentum + v * (1 - self.momentum)
                mem[y] = pos / pos.pow(2).sum(1, keepdim=True).pow(0.5)
        return out_v1 / self.Z_v1, out_v2 / self.Z_v2

    @staticmethod
    def loss(x, n_data, eps=1e-7):
        bsz, m = x.shape[0], x.size(1) - 1
        pn = 1 / float(n_data)
        log_d1 = torch.log(x[:, 0] / (x[:, 0] + m * pn + eps))
        log_d0 = torch.log((m * pn) / (x[:, 1:] + m * pn + eps))
        return -(log_d1.sum(0) + log_d0.reshape(-1).sum(0)) / bsz


def test_crd_equals_repdistiller_given_the_same_negatives(monkeypatch):
    """kdrun draws its K negatives uniformly (RepDistiller's CIFAR mode draws them from other classes, see
    kdrun.losses.crd); with the same negatives, loss, gradients and memory updates are RepDistiller's."""
    B, N, K = 6, 40, 16
    fs, fs64 = leaf(B, 32)
    ft, ft64 = leaf(B, 64)
    index = torch.tensor([3, 7, 11, 20, 25, 39])
    m = built(
        "crd",
        [ft.shape],
        [fs.shape],
        num_samples=N,
        t_names=["pre_logits"],
        s_names=["pre_logits"],
        weight=0.8,
        nce_k=K,
        nce_t=0.07,
        nce_m=0.5,
        embed_dim=16,
    )
    negatives = torch.randint(0, N, (B, K))
    monkeypatch.setattr(m, "sample_negatives", lambda batch, device: negatives)
    ref = RefContrast(m.memory_s.to(D), m.memory_t.to(D), K, 0.07, 0.5)
    es, et = m.adapters[0].linear, m.embed_t.linear
    ws, bs, wt, bt = p64(es.weight), p64(es.bias), p64(et.weight), p64(et.bias)

    def embed(x, w, b):  # RepDistiller crd/criterion.py Embed: Linear, then x / ||x||_2 (Normalize(2))
        z = F.linear(x, w, b)
        return z / z.pow(2).sum(1, keepdim=True).pow(0.5)

    v1, v2 = embed(fs64, ws, bs), embed(ft64.detach(), wt, bt)
    idx = torch.cat([index[:, None], negatives], dim=1)
    out_v1, out_v2 = ref.scores(v1, v2, index, idx)
    want = 0.8 * (RefContrast.loss(out_v1, N) + RefContrast.loss(out_v2, N))  # criterion_s(out_s) + criterion_t(out_t)
    got = m(
        Outputs(torch.zeros(B, 5), [fs]), Outputs(torch.zeros(B, 5), [ft]), ctx_for([0] * B, index=index, num_samples=N)
    )["crd"]
    agree(got, want, [(fs, fs64), (es.weight, ws), (es.bias, bs), (et.weight, wt), (et.bias, bt)])
    torch.testing.assert_close(m.memory_s.to(D), ref.memory_v1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.memory_t.to(D), ref.memory_v2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.z.to(D), torch.tensor([ref.Z_v1, ref.Z_v2], dtype=D), rtol=1e-4, atol=0)


# ---------------------------------------------------------------- combo: "method + KD" runs


def test_combo_equals_repdistillers_method_plus_kd_loop():
    # RepDistiller helper/loops.py train_distill: loss = gamma * CE + alpha * DistillKL(T=4) + beta * sum(AT);
    # the README's "AT + KD" runs use -r 1 -a 1 -b 1000
    s, s64 = leaf(4, 10, scale=3)
    t, t64 = leaf(4, 10, scale=3)
    fs, fs64 = leaf(4, 8, 4, 4)
    ft, ft64 = leaf(4, 16, 4, 4)
    y = torch.randint(0, 10, (4,))
    m = LOSSES.get("combo")(
        terms={
            "kd": {"temperature": 4.0, "alpha": 1.0},
            "at": {"weight": 1000.0, "layers": {"teacher": ["stage1"], "student": ["stage1"]}},
        },
        ce_weight=1.0,
    )
    m.build([ft.shape], [fs.shape], 16)
    want = (
        1.0 * F.cross_entropy(s64, y)
        + 1.0 * ref_distill_kl(s64, t64.detach(), 4.0)
        + 1000.0 * ref_at([fs64], [ft64.detach()])
    )
    agree(total_loss(m, s, t, y, [fs], [ft]), want, [(s, s64), (fs, fs64)])


# ---------------------------------------------------------------- VID


def ref_vid(f_s, f_t, w1, w2, w3, log_scale, eps=1e-5):
    # RepDistiller distiller_zoo/VID.py VIDLoss (and mdistiller VID.vid_loss): pool the larger square map;
    # regressor conv1x1 -> ReLU -> conv1x1 -> ReLU -> conv1x1 (no bias); pred_var = log(1 + exp(log_scale)) + eps;
    # mean of 0.5 * ((pred_mean - target)^2 / pred_var + log(pred_var))
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    pred_mean = F.conv2d(F.relu(F.conv2d(F.relu(F.conv2d(f_s, w1)), w2)), w3)
    pred_var = (torch.log(1.0 + torch.exp(log_scale)) + eps).view(1, -1, 1, 1)
    return torch.mean(0.5 * ((pred_mean - f_t) ** 2 / pred_var + torch.log(pred_var)))


def test_vid_equals_repdistiller():
    # --distill vid -a 0 -b 1, g_s = feat_s[1:-1], VIDLoss(s_C, t_C, t_C), init_pred_var 5, eps 1e-5
    pairs = [leaf(4, 8, 8, 8), leaf(4, 16, 4, 4)]
    teach = [leaf(4, 12, 4, 4), leaf(4, 24, 4, 4)]
    m = built("vid", [t.shape for t, _ in teach], [s.shape for s, _ in pairs], weight=1.0)
    for reg in m.adapters:
        torch.testing.assert_close(reg.variance().detach(), torch.full((reg.log_scale.numel(),), 5.0))
        with torch.no_grad():  # move the variances off their initial value so that their gradient is checked
            reg.log_scale.add_(torch.linspace(-1, 1, reg.log_scale.numel()))
    want, params = 0, []
    for (_, s64), (_, t64), reg in zip(pairs, teach, m.adapters):
        w = [p64(reg.mean[j].weight) for j in (0, 2, 4)]
        a = p64(reg.log_scale)
        want = want + ref_vid(s64, t64.detach(), *w, a)
        params += [(reg.mean[0].weight, w[0]), (reg.mean[4].weight, w[2]), (reg.log_scale, a)]
    got = m(
        Outputs(torch.zeros(4, 5), [s for s, _ in pairs]),
        Outputs(torch.zeros(4, 5), [t for t, _ in teach]),
        ctx_for([0, 1, 2, 3]),
    )["vid"]
    agree(got, want, pairs + params)


# ---------------------------------------------------------------- KDSVD


def ref_kdsvd(g_s, g_t, k=1):
    # RepDistiller distiller_zoo/KDSVD.py: per layer, x = feat.view(-1, C, H*H).transpose(-2, -1) ([B, HW, C]),
    # u, s, v = torch.svd(x), non-finite -> 0, keep n columns, F.normalize(dim=1) (v over channels, s over the n);
    # teacher n = k, student n = k + 3; align_rsv keeps, per teacher vector, the student vector of max |cosine|
    # with its sign; both times the teacher's s; for i > 0 the RBF exp(-(v_i[c] - v_{i-1}[c'])^2 / 8) of
    # consecutive layers, (s_rbf - t_rbf)^2 (non-finite -> 0) summed; each / bsz; a list, summed by the loop
    def nan0(x):
        return torch.where(torch.isfinite(x), x, torch.zeros_like(x))

    def svd(feat, n):
        size = feat.shape
        x = feat.view(-1, size[1], size[2] * size[2]).transpose(-2, -1)
        u, s, v = torch.svd(x)
        return (
            F.normalize(nan0(u)[:, :, :n], dim=1),
            F.normalize(nan0(s)[:, :n], dim=1),
            F.normalize(nan0(v)[:, :, :n], dim=1),
        )

    def align_rsv(a, b):
        cosine = torch.matmul(a.transpose(-2, -1), b)
        max_abs, _ = torch.max(torch.abs(cosine), 1, keepdim=True)
        mask = torch.where(torch.eq(max_abs, torch.abs(cosine)), torch.sign(cosine), torch.zeros_like(cosine))
        return torch.matmul(a, mask), b

    v_sb = v_tb = None
    losses = []
    for i, (f_s, f_t) in enumerate(zip(g_s, g_t)):
        _, s_t, v_t = svd(f_t, k)
        _, _, v_s = svd(f_s, k + 3)
        v_s, v_t = align_rsv(v_s, v_t)
        s_t = s_t.unsqueeze(1)
        v_t, v_s = v_t * s_t, v_s * s_t
        if i > 0:
            s_rbf = torch.exp(-(v_s.unsqueeze(2) - v_sb.unsqueeze(1)).pow(2) / 8)
            t_rbf = torch.exp(-(v_t.unsqueeze(2) - v_tb.unsqueeze(1)).pow(2) / 8)
            losses.append(nan0((s_rbf - t_rbf.detach()).pow(2)).sum())
        v_tb, v_sb = v_t, v_s
    return sum(loss / g_s[0].shape[0] for loss in losses)


@pytest.mark.parametrize("k", [1, 2])
def test_kdsvd_equals_repdistiller(k):
    # g_s = feat_s[1:-1]; mdistiller CFG.KDSVD: K 1, FEAT_WEIGHT 1 (channel counts equal per pair, square maps)
    pairs = [leaf(4, 8, 8, 8), leaf(4, 16, 4, 4), leaf(4, 16, 2, 2)]
    teach = [leaf(4, 8, 8, 8, scale=2), leaf(4, 16, 4, 4), leaf(4, 16, 2, 2, scale=0.5)]
    m = built("kdsvd", [t.shape for t, _ in teach], [s.shape for s, _ in pairs], weight=1.0, k=k)
    got = m(
        Outputs(torch.zeros(4, 5), [s for s, _ in pairs]),
        Outputs(torch.zeros(4, 5), [t for t, _ in teach]),
        ctx_for([0, 1, 2, 3]),
    )["kdsvd"]
    want = ref_kdsvd([s for _, s in pairs], [t.detach() for _, t in teach], k)
    agree(got, want, pairs)


def test_kdsvd_and_fsp_refuse_unrelatable_layers():
    from kdrun.errors import ConfigError

    for method in ("kdsvd", "fsp"):  # both relate consecutive layers: one pair is refused
        with pytest.raises(
            ConfigError, match=rf"^loss\.layers: {method} relates consecutive layers and needs at least 2"
        ):
            built(method, [(2, 8, 4, 4)], [(2, 8, 4, 4)])
    with pytest.raises(
        ConfigError,
        match=r"^loss\.layers: teacher stage1 \[16,4,4\] and student stage1 \[8,4,4\]: "
        r"kdsvd needs equal teacher and student channel counts",
    ):
        built("kdsvd", [(2, 16, 4, 4), (2, 16, 2, 2)], [(2, 8, 4, 4), (2, 16, 2, 2)])


# ---------------------------------------------------------------- ReviewKD


def ref_abf(x, y, shape, out_shape, p, fuse):
    # mdistiller distillers/ReviewKD.py ABF.forward: conv1 (1x1, BN); if fuse: y upsampled (nearest) to
    # (shape, shape), z = sigmoid(att_conv(cat[x, y])), x = x * z[:, 0] + y * z[:, 1]; resized (nearest) to
    # out_shape if needed; y = conv2 (3x3, pad 1, BN); returns (y, x). BN in training mode.
    n, _, h, w = x.shape
    x = F.batch_norm(F.conv2d(x, p["c1"]), None, None, p["bn1w"], p["bn1b"], training=True)
    if fuse:
        y = F.interpolate(y, (shape, shape), mode="nearest")
        z = torch.sigmoid(F.conv2d(torch.cat([x, y], dim=1), p["aw"], p["ab"]))
        x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
    if x.shape[-1] != out_shape:
        x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
    return F.batch_norm(F.conv2d(x, p["c2"], padding=1), None, None, p["bn2w"], p["bn2b"], training=True), x


def ref_hcl(fstudent, fteacher):
    # mdistiller distillers/ReviewKD.py hcl_loss
    loss_all = 0.0
    for fs, ft in zip(fstudent, fteacher):
        h = fs.shape[2]
        loss, cnt, tot = F.mse_loss(fs, ft, reduction="mean"), 1.0, 1.0
        for level in [4, 2, 1]:
            if level >= h:
                continue
            cnt /= 2.0
            loss = (
                loss
                + F.mse_loss(
                    F.adaptive_avg_pool2d(fs, (level, level)),
                    F.adaptive_avg_pool2d(ft, (level, level)),
                    reduction="mean",
                )
                * cnt
            )
            tot += cnt
        loss_all = loss_all + loss / tot
    return loss_all


def ref_reviewkd(feats, pooled, t_preact, t_pooled, params, shapes, out_shapes, weight, epoch, warmup=20):
    # ReviewKD.forward_train: x = feats + [pooled[..., None, None]] reversed; abfs built for levels in order
    # (fuse for all but the last) then reversed; results inserted at the front; teacher preact_feats[1:] +
    # pooled; weight * min(epoch / warmup, 1) * hcl_loss (epoch 1-based)
    x = (feats + [pooled[:, :, None, None]])[::-1]
    ps = params[::-1]
    out, res = ref_abf(x[0], None, None, out_shapes[0], ps[0], fuse=False)
    results = [out]
    for feat, p, shape, out_shape in zip(x[1:], ps[1:], shapes[1:], out_shapes[1:]):
        out, res = ref_abf(feat, res, shape, out_shape, p, fuse=True)
        results.insert(0, out)
    teacher = t_preact + [t_pooled[:, :, None, None]]
    return weight * min(epoch / warmup, 1.0) * ref_hcl(results, teacher)


@pytest.mark.parametrize("epoch_1based, weight", [(3, 1.0), (40, 5.0)])
def test_reviewkd_equals_mdistiller(epoch_1based, weight):
    # resnet-like student (stages 16x16, 8x8, 4x4 + pooled) and a wider teacher (pre-activation stages)
    B = 4
    s_maps = [leaf(B, 8, 16, 16), leaf(B, 16, 8, 8), leaf(B, 32, 4, 4)]
    s_pool = leaf(B, 32)
    t_maps = [leaf(B, 16, 16, 16), leaf(B, 32, 8, 8), leaf(B, 64, 4, 4)]
    t_pool = leaf(B, 64)
    t_names = ["stage1_preact", "stage2_preact", "stage3_preact", "pre_logits"]
    s_names = ["stage1", "stage2", "stage3", "pre_logits"]
    m = built(
        "reviewkd",
        [t.shape for t, _ in t_maps] + [t_pool[0].shape],
        [s.shape for s, _ in s_maps] + [s_pool[0].shape],
        t_names=t_names,
        s_names=s_names,
        weight=weight,
        warmup=20,
    )
    assert [a.conv1[0].out_channels for a in m.abfs] == [32] * 4  # mid = min(512, student pooled width)
    params, pairs = [], []
    for abf in m.abfs:
        p = {
            "c1": p64(abf.conv1[0].weight),
            "bn1w": p64(abf.conv1[1].weight),
            "bn1b": p64(abf.conv1[1].bias),
            "c2": p64(abf.conv2[0].weight),
            "bn2w": p64(abf.conv2[1].weight),
            "bn2b": p64(abf.conv2[1].bias),
        }
        pairs += [(abf.conv1[0].weight, p["c1"]), (abf.conv2[0].weight, p["c2"])]
        if abf.att_conv is not None:
            p["aw"], p["ab"] = p64(abf.att_conv[0].weight), p64(abf.att_conv[0].bias)
            pairs += [(abf.att_conv[0].weight, p["aw"])]
        params.append(p)
    want = ref_reviewkd(
        [s for _, s in s_maps],
        s_pool[1],
        [t.detach() for _, t in t_maps],
        t_pool[1].detach(),
        params,
        shapes=[1, 4, 8, 16],
        out_shapes=[1, 4, 8, 16],
        weight=weight,
        epoch=epoch_1based,
    )
    got = m(
        Outputs(torch.zeros(B, 5), [s for s, _ in s_maps] + [s_pool[0]]),
        Outputs(torch.zeros(B, 5), [t for t, _ in t_maps] + [t_pool[0]]),
        ctx_for([0] * B, epoch=epoch_1based - 1),
    )["reviewkd"]
    agree(got, want, s_maps + [s_pool] + pairs)


def test_reviewkd_default_layers_prefer_the_teachers_preactivation():
    m = LOSSES.get("reviewkd")()
    t_points = ["stem", "stage1", "stage1_preact", "stage2", "stage2_preact", "pre_logits"]
    assert m.default_layers(t_points, ["stage1", "stage2", "pre_logits"]) == (
        ["stage1_preact", "stage2_preact", "pre_logits"],
        ["stage1", "stage2", "pre_logits"],
    )
    assert m.default_layers(["stage1", "stage2", "pre_logits"], ["stage1", "stage2", "pre_logits"]) == (
        ["stage1", "stage2", "pre_logits"],
        ["stage1", "stage2", "pre_logits"],
    )


# ---------------------------------------------------------------- OFD


def ref_ofd_margin(bn_weight, bn_bias):
    # mdistiller distillers/OFD.py init_ofd_modules, per channel: s = |gamma|, m = beta; if norm.cdf(-m / s) > 0.001:
    # -s * exp(-(m / s)^2 / 2) / sqrt(2 pi) / norm.cdf(-m / s) + m, else -3 s (norm.cdf written with erf here)
    def cdf(x):
        return 0.5 * (1 + math.erf(x / math.sqrt(2)))

    margin = []
    for s, m in zip(bn_weight.tolist(), bn_bias.tolist()):
        s = abs(s)
        if cdf(-m / s) > 0.001:
            margin.append(-s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / cdf(-m / s) + m)
        else:
            margin.append(-3 * s)
    return torch.tensor(margin, dtype=D).view(1, -1, 1, 1)


def ref_ofd(feature_student, feature_teacher, connectors, margins):
    # mdistiller OFD.ofd_loss / feat_loss: connector (conv 1x1 no bias -> BN), teacher pooled to the student's
    # size (detached); partial L2 masks; torch.abs(loss).mean(dim=0).sum(); level i divided by 2^(n - i - 1)
    def feat_loss(source, target, margin):
        loss = (
            (source - margin) ** 2 * ((source > margin) & (target <= margin)).to(D)
            + (source - target) ** 2 * ((source > target) & (target > margin) & (target <= 0)).to(D)
            + (source - target) ** 2 * (target > 0).to(D)
        )
        return torch.abs(loss).mean(dim=0).sum()

    n = len(feature_student)
    total = 0
    for i, (f_s, f_t) in enumerate(zip(feature_student, feature_teacher)):
        w, g, b = connectors[i]
        src = F.batch_norm(F.conv2d(f_s, w), None, None, g, b, training=True)
        total = total + feat_loss(src, F.adaptive_avg_pool2d(f_t, src.shape[-2:]).detach(), margins[i]) / 2 ** (
            n - i - 1
        )
    return total


class FakeTeacher(torch.nn.Module):
    """Only what OFD reads from a teacher: the BatchNorms before its pre-activation points."""

    def __init__(self, channels):
        super().__init__()
        self.bns = torch.nn.ModuleList(torch.nn.BatchNorm2d(c) for c in channels)
        for bn in self.bns:  # varied affine parameters: some channels far in the negative tail (-3|gamma| branch)
            with torch.no_grad():
                bn.weight.uniform_(-1.5, 1.5)
                bn.bias.normal_(0, 2)
                bn.bias[0] = 10.0
        self.preact_bn = {f"stage{i + 1}_preact": f"bns.{i}" for i in range(len(channels))}


def test_ofd_equals_mdistiller():
    # CFG.OFD: FEAT_WEIGHT 0.001, CE 1, connector kernel 1; student and teacher pre-activation stage features
    B = 4
    s_maps = [leaf(B, 8, 8, 8), leaf(B, 16, 4, 4), leaf(B, 32, 2, 2)]
    t_maps = [leaf(B, 16, 16, 16), leaf(B, 32, 4, 4), leaf(B, 64, 2, 2)]
    t_names = [f"stage{i + 1}_preact" for i in range(3)]
    m = built("ofd", [t.shape for t, _ in t_maps], [s.shape for s, _ in s_maps], t_names=t_names, weight=0.001)
    teacher = FakeTeacher([16, 32, 64])
    m.bind_teacher(teacher)
    margins = [ref_ofd_margin(bn.weight.detach(), bn.bias.detach()) for bn in teacher.bns]
    assert any(
        (mg == -3 * bn.weight.detach().abs().to(D).view(1, -1, 1, 1)).any() for mg, bn in zip(margins, teacher.bns)
    )
    connectors, pairs = [], []
    for conv, bn in m.adapters:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
        c = (p64(conv.weight), p64(bn.weight), p64(bn.bias))
        connectors.append(c)
        pairs += [(conv.weight, c[0]), (bn.weight, c[1])]
    want = 0.001 * ref_ofd([s for _, s in s_maps], [t.detach() for _, t in t_maps], connectors, margins)
    got = m(
        Outputs(torch.zeros(B, 5), [s for s, _ in s_maps]),
        Outputs(torch.zeros(B, 5), [t for t, _ in t_maps]),
        ctx_for([0] * B),
    )["ofd"]
    agree(got, want, s_maps + pairs)


def test_ofd_connector_init_and_layers():
    m = built("ofd", [(2, 64, 4, 4)], [(2, 16, 4, 4)], t_names=["stage3_preact"], s_names=["stage3"])
    conv, bn = m.adapters[0]
    assert conv.bias is None and bn.weight.eq(1).all() and bn.bias.eq(0).all()
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.15)  # N(0, 2 / (k * k * C_t))
    t_points = ["stage1", "stage1_preact", "stage2", "stage2_preact", "pre_logits"]
    assert m.default_layers(t_points, ["stage1", "stage2"]) == (
        ["stage1_preact", "stage2_preact"],
        ["stage1", "stage2"],
    )
    from kdrun.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^loss\.layers: ofd needs the teacher's pre-activation features"):
        m.default_layers(["stage1", "stage2"], ["stage1", "stage2"])
    with pytest.raises(ConfigError, match=r"^loss\.layers\.teacher: ofd computes its margins from the BatchNorm"):
        m.bind_teacher(torch.nn.Conv2d(1, 1, 1))


# ---------------------------------------------------------------- FT


def ref_seq(x, layers):
    # RepDistiller models/util.py Paraphraser / Translator: (conv or transposed conv 3x3 pad 1 with bias,
    # optional BN in training mode, LeakyReLU(0.1)) x 3;
    # layers = [(weight, bias, bn_weight or None, bn_bias, transposed)]
    for w, b, g, beta, transposed in layers:
        x = (F.conv_transpose2d if transposed else F.conv2d)(x, w, b, padding=1)
        if g is not None:
            x = F.batch_norm(x, None, None, g, beta, training=True)
        x = F.leaky_relu(x, 0.1)
    return x


def ref_factor_transfer(f_s, f_t, p1=2, p2=1):
    # RepDistiller distiller_zoo/FT.py FactorTransfer.factor_loss: pool the larger (square) map;
    # factor(f) = normalize(f.pow(p1).mean(1).view(B, -1)); p2 = 1: (factor_s - factor_t).abs().mean()
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))

    def factor(f):
        return F.normalize(f.pow(p1).mean(1).view(f.size(0), -1))

    return (factor(f_s) - factor(f_t)).abs().mean()


def _seq_params(seq, transposed):
    """(float64 leaves, [(param, leaf)]) of a kdrun conv/BN/LeakyReLU stack, in ref_seq's layout."""
    mods = list(seq)
    layers, pairs, i = [], [], 0
    while i < len(mods):
        conv, bn = mods[i], mods[i + 1] if isinstance(mods[i + 1], torch.nn.BatchNorm2d) else None
        w, b = p64(conv.weight), p64(conv.bias)
        g, beta = (p64(bn.weight), p64(bn.bias)) if bn is not None else (None, None)
        layers.append((w, b, g, beta, transposed))
        pairs.append((conv.weight, w))
        i += 3 if bn is not None else 2
    return layers, pairs


def test_ft_equals_repdistiller():
    # --distill factor -a 0 -b 200: factor_s = translator(feat_s[-2]), factor_t = paraphraser(feat_t[-2],
    # is_factor=True) (paraphraser frozen, use_bn False; translator use_bn True), k = 0.5
    fs, fs64 = leaf(4, 16, 8, 8)
    ft, ft64 = leaf(4, 32, 4, 4)
    m = built("ft", [ft.shape], [fs.shape], weight=200.0)
    enc, _ = _seq_params(m.paraphraser.encoder, transposed=False)
    tr, tr_pairs = _seq_params(m.adapters[0], transposed=False)
    want = 200.0 * ref_factor_transfer(ref_seq(fs64, tr), ref_seq(ft64.detach(), enc).detach())
    got = m(Outputs(torch.zeros(4, 5), [fs]), Outputs(torch.zeros(4, 5), [ft]), ctx_for([0] * 4))["ft"]
    agree(got, want, [(fs, fs64)] + tr_pairs)
    assert all(p.grad is None for p in m.paraphraser.parameters())  # the student stage reads it only


def test_ft_paraphraser_stage_equals_repdistillers_init():
    # helper/pretrain.py init, factor: _, f_t_rec = paraphraser(feat_t[-2]); MSELoss(f_t_rec, f_t); SGD lr 0.01
    from kdrun.data.loader import Batch
    from kdrun.models import build_model

    teacher = build_model("resnet20", 10, 1, 8).eval()
    m = LOSSES.get("ft")(layers={"teacher": ["stage3"], "student": ["stage3"]})
    m.build([torch.Size([2, 64, 2, 2])], [torch.Size([2, 16, 2, 2])], 10)
    (pre,) = m.pre_stages(teacher, None)  # FT's paraphraser stage does not train the student
    assert pre.name == "paraphraser" and pre.trainable is m.paraphraser and pre.epochs == 30
    assert pre.optim == {"lr": 0.01, "schedule": "constant", "warmup_epochs": 0}
    x = torch.randn(4, 1, 8, 8)
    with pre.objective:
        got = pre.objective(
            m.paraphraser,
            Batch(x, torch.zeros(4, dtype=torch.long), torch.arange(4), torch.zeros(4, dtype=torch.long)),
            0,
        )["paraphraser"]
        assert all(p.requires_grad for p in m.paraphraser.parameters())
    assert not any(p.requires_grad for p in m.paraphraser.parameters())  # frozen after its stage
    from kdrun.models.features import FeatureTap

    with torch.no_grad(), FeatureTap(teacher, ["stage3"]) as tap:
        teacher(x)
    f_t = tap.features["stage3"].to(D)
    enc, _ = _seq_params(m.paraphraser.encoder, transposed=False)
    dec, _ = _seq_params(m.paraphraser.decoder, transposed=True)
    want = F.mse_loss(ref_seq(ref_seq(f_t, enc), dec), f_t)
    assert got.item() == pytest.approx(want.item(), rel=1e-4)


# ---------------------------------------------------------------- FSP and AB (initialisation stages)


def ref_fsp(g_s, g_t):
    # RepDistiller distiller_zoo/FSP.py: for consecutive (bot, top), pool the larger (square) map;
    # fsp = (bot.unsqueeze(1) * top.unsqueeze(2)).view(B, C_top, C_bot, -1).mean(-1); per pair (s - t)^2 mean;
    # helper/pretrain.py init: loss = sum(loss_group)
    def compute_fsp(g):
        out = []
        for bot, top in itertools.pairwise(g):
            b_h, t_h = bot.shape[2], top.shape[2]
            if b_h > t_h:
                bot = F.adaptive_avg_pool2d(bot, (t_h, t_h))
            elif b_h < t_h:
                top = F.adaptive_avg_pool2d(top, (b_h, b_h))
            bot, top = bot.unsqueeze(1), top.unsqueeze(2)
            bot = bot.view(bot.shape[0], bot.shape[1], bot.shape[2], -1)
            top = top.view(top.shape[0], top.shape[1], top.shape[2], -1)
            out.append((bot * top).mean(-1))
        return out

    return sum((s - t).pow(2).mean() for s, t in zip(compute_fsp(g_s), compute_fsp(g_t)))


def test_fsp_init_stage_equals_repdistiller():
    pairs = [leaf(4, 8, 8, 8), leaf(4, 16, 4, 4), leaf(4, 32, 2, 2)]
    teach = [leaf(4, 8, 8, 8), leaf(4, 16, 4, 4), leaf(4, 32, 2, 2)]
    m = built("fsp", [t.shape for t, _ in teach], [s.shape for s, _ in pairs])
    got = m.init_loss([s for s, _ in pairs], [t.detach() for t, _ in teach])["fsp"]
    agree(got, ref_fsp([s for _, s in pairs], [t.detach() for _, t in teach]), pairs)
    assert (
        m(
            Outputs(torch.zeros(4, 5), [s for s, _ in pairs]),
            Outputs(torch.zeros(4, 5), [t for t, _ in teach]),
            ctx_for([0] * 4),
        )
        == {}
    )  # RepDistiller: loss_kd = 0 in the student stage, CE only


def ref_ab(g_s, g_t, margin=1.0):
    # RepDistiller distiller_zoo/AB.py ABLoss: w_i = 2^(i - n + 1); criterion_alternative_l2 =
    # |(s + m)^2 [s > -m & t <= 0] + (s - m)^2 [s <= m & t > 0]|.sum(); each * w_i / bsz / 1000 * 3; summed in init
    n, bsz = len(g_s), g_s[0].shape[0]
    total = 0
    for i, (s, t) in enumerate(zip(g_s, g_t)):
        loss = (s + margin) ** 2 * ((s > -margin) & (t <= 0)).to(D) + (s - margin) ** 2 * ((s <= margin) & (t > 0)).to(
            D
        )
        total = total + 2 ** (i - n + 1) * torch.abs(loss).sum() / bsz / 1000 * 3
    return total


def test_ab_init_stage_equals_repdistiller():
    # --distill abound: Connector = ConvReg(use_relu=False) (conv -> BN) where shapes differ, else identity;
    # g_s = connector(feat_s[1:-1]) and g_t = feat_t[1:-1], both pre-activation
    pairs = [leaf(4, 8, 8, 8), leaf(4, 16, 4, 4)]
    teach = [leaf(4, 8, 8, 8), leaf(4, 32, 4, 4)]
    m = built(
        "ab", [t.shape for t, _ in teach], [s.shape for s, _ in pairs], t_names=["stage1_preact", "stage2_preact"]
    )
    assert isinstance(m.adapters[0], torch.nn.Identity)
    conv, bn = m.adapters[1]
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    w, g, b = p64(conv.weight), p64(bn.weight), p64(bn.bias)
    conv_bias = torch.randn(32, dtype=D)  # ConvReg's conv has a bias, cancelled by BN in training mode
    src = [pairs[0][1], F.batch_norm(F.conv2d(pairs[1][1], w, conv_bias), None, None, g, b, training=True)]
    want = ref_ab(src, [t.detach() for _, t in teach])
    got = m.init_loss([s for s, _ in pairs], [t.detach() for t, _ in teach])["ab"]
    agree(got, want, pairs + [(conv.weight, w), (bn.weight, g)])


@pytest.mark.parametrize("name", ["fsp", "ab"])
def test_init_stage_trains_the_student_and_adapters_against_the_frozen_teacher(name):
    from kdrun.data.loader import Batch
    from kdrun.models import build_model

    teacher = build_model("resnet20", 10, 1, 8).eval().requires_grad_(False)
    student = build_model("resnet8", 10, 1, 8)
    m = LOSSES.get(name)(init_epochs=30)
    m.teacher_layers, m.student_layers = m.default_layers(list(teacher.feature_points), list(student.feature_points))
    from kdrun.distill import probe_shapes

    x = torch.randn(6, 1, 8, 8)
    m.build(probe_shapes(teacher, m.teacher_layers, x[:2]), probe_shapes(student, m.student_layers, x[:2]), 40)
    (pre,) = m.pre_stages(teacher, student)
    assert pre.name == "init" and pre.epochs == 30 and pre.optim["schedule"] == "constant"
    assert pre.trainable.student is student
    with pre.objective:
        terms = pre.objective(
            pre.trainable,
            Batch(x, torch.zeros(6, dtype=torch.long), torch.arange(6), torch.zeros(6, dtype=torch.long)),
            0,
        )
    assert set(terms) == {name}
    terms[name].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert student.fc.weight.grad is None  # the classifier is not part of the feature loss


def test_every_registered_method_has_an_official_reference_here():
    tested = {"kd", "dkd", "dist", "ls_kd", "fitnet", "at", "nst", "rkd", "sp", "pkt", "cc", "crd", "combo"}
    tested |= {"vid", "kdsvd", "reviewkd", "ofd", "ft", "fsp", "ab"}
    missing = set(LOSSES.names()) - tested
    assert not missing, f"methods without a test against their authors' code: {sorted(missing)}"
