"""Every KD method against an independent NumPy / plain-loop computation of its paper's formula,
plus gradient flow, layer/shape errors, the combo and the method YAMLs."""

from importlib import resources

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from kdrun.errors import ConfigError
from kdrun.losses import LOSSES, Outputs, StepContext

FEATURE_METHODS = ["fitnet", "at", "nst", "rkd", "sp", "pkt", "cc", "crd", "vid", "kdsvd", "reviewkd"]
LOGIT_METHODS = ["kd", "dkd", "dist", "ls_kd"]


# ---------------------------------------------------------------- helpers (NumPy, float64)


def np_log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_softmax(z):
    return np.exp(np_log_softmax(z))


def np_kl_rows(p, q):
    """KL(p || q) of each row, as a plain sum."""
    return np.array([sum(pi * (np.log(pi) - np.log(qi)) for pi, qi in zip(pr, qr) if pi > 0) for pr, qr in zip(p, q)])


def np_huber(d):
    d = np.abs(d)
    return np.where(d < 1, 0.5 * d * d, d - 0.5)


def np_normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def t64(a, grad=False):
    return torch.tensor(a, dtype=torch.float32, requires_grad=grad)


def make_ctx(y, index=None, epoch=0, epochs=10, num_samples=0):
    y = torch.as_tensor(y)
    index = torch.arange(len(y)) if index is None else torch.as_tensor(index)
    return StepContext(y, index, epoch, epochs, num_samples)


def build(name, t_shapes, s_shapes, num_samples=32, t_names=None, s_names=None, **kw):
    t_names = t_names or [f"stage{i + 1}" for i in range(len(t_shapes))]
    s_names = s_names or [f"stage{i + 1}" for i in range(len(s_shapes))]
    m = LOSSES.get(name)(layers={"teacher": t_names, "student": s_names}, **kw)
    m.build([torch.Size(s) for s in t_shapes], [torch.Size(s) for s in s_shapes], num_samples)
    return m


def run(m, s_feats, t_feats, ctx, s_logits=None, t_logits=None):
    B = len(s_feats[0])
    s_logits = torch.zeros(B, 5) if s_logits is None else s_logits
    t_logits = torch.zeros(B, 5) if t_logits is None else t_logits
    return m(Outputs(s_logits, list(s_feats)), Outputs(t_logits, list(t_feats)), ctx)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------- KD


def np_kd_soft(s, t, T):
    return T * T * np_kl_rows(np_softmax(t / T), np_softmax(s / T)).mean()


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_alpha_one_keeps_t_squared_and_drops_ce(rng, T):
    s, t = rng.normal(0, 2, (6, 7)), rng.normal(0, 2, (6, 7))
    m = LOSSES.get("kd")(temperature=T, alpha=1.0)
    out = m(Outputs(t64(s)), Outputs(t64(t)), make_ctx(rng.integers(0, 7, 6)))
    assert set(out) == {"kd"} and m.ce_weight == 0.0
    assert out["kd"].item() == pytest.approx(np_kd_soft(s, t, T), rel=1e-5)
    if T != 1.0:  # without the T^2 factor the value would be T^2 times smaller
        assert out["kd"].item() != pytest.approx(np_kd_soft(s, t, T) / (T * T), rel=1e-2)


def test_kd_direction_is_teacher_to_student_and_reduction_is_batch_mean(rng):
    T, B, C = 4.0, 6, 7
    s, t = rng.normal(0, 3, (B, C)), rng.normal(0, 3, (B, C))
    got = LOSSES.get("kd")(temperature=T, alpha=0.9)(Outputs(t64(s)), Outputs(t64(t)), make_ctx(np.zeros(B, int)))
    forward = 0.9 * np_kd_soft(s, t, T)
    reverse = 0.9 * T * T * np_kl_rows(np_softmax(s / T), np_softmax(t / T)).mean()
    per_element = forward / C  # "mean" over all B*C entries instead of sum over classes then batch mean
    assert got["kd"].item() == pytest.approx(forward, rel=1e-5)
    assert abs(forward - reverse) > 1e-3 * abs(forward)
    assert got["kd"].item() != pytest.approx(reverse, rel=1e-3)
    assert got["kd"].item() != pytest.approx(per_element, rel=1e-3)


# ---------------------------------------------------------------- DKD


def np_dkd(s, t, y, alpha, beta, T):
    total_tckd, total_nckd = 0.0, 0.0
    for zs, zt, g in zip(s, t, y):
        ps, pt = np_softmax(zs / T), np_softmax(zt / T)
        bs, bt = np.array([ps[g], 1 - ps[g]]), np.array([pt[g], 1 - pt[g]])
        total_tckd += sum(bt[k] * np.log(bt[k] / bs[k]) for k in range(2))
        others = [c for c in range(len(zs)) if c != g]
        qs, qt = np_softmax(zs[others] / T), np_softmax(zt[others] / T)
        total_nckd += sum(qt[k] * np.log(qt[k] / qs[k]) for k in range(len(others)))
    n = len(y)
    return T * T * (alpha * total_tckd / n + beta * total_nckd / n)


def test_dkd_matches_paper_and_warms_up(rng):
    s, t, y = rng.normal(0, 2, (5, 6)), rng.normal(0, 2, (5, 6)), rng.integers(0, 6, 5)
    m = LOSSES.get("dkd")(alpha=1.0, beta=8.0, temperature=4.0, warmup=20)
    full = np_dkd(s, t, y, 1.0, 8.0, 4.0)
    for epoch, ramp in [(0, 1 / 20), (9, 10 / 20), (19, 1.0), (100, 1.0)]:
        got = m(Outputs(t64(s)), Outputs(t64(t)), make_ctx(y, epoch=epoch, epochs=240))["dkd"]
        assert got.item() == pytest.approx(ramp * full, rel=1e-4)
    assert m.ce_weight == 1.0


# ---------------------------------------------------------------- DIST


def test_dist_matches_pearson_relations(rng):
    s, t = rng.normal(0, 2, (6, 5)), rng.normal(0, 2, (6, 5))
    beta, gamma, tau = 2.0, 0.5, 4.0
    ys, yt = np_softmax(s / tau), np_softmax(t / tau)
    inter = 1 - np.mean([np.corrcoef(ys[i], yt[i])[0, 1] for i in range(6)])
    intra = 1 - np.mean([np.corrcoef(ys[:, c], yt[:, c])[0, 1] for c in range(5)])
    want = tau**2 * (beta * inter + gamma * intra)
    m = LOSSES.get("dist")(beta=beta, gamma=gamma, tau=tau)
    got = m(Outputs(t64(s)), Outputs(t64(t)), make_ctx(np.zeros(6, int)))
    assert got["dist"].item() == pytest.approx(want, rel=1e-4)


# ---------------------------------------------------------------- LS-KD


def test_ls_kd_standardises_logits_before_kd(rng):
    s, t = rng.normal(1, 2, (6, 8)), rng.normal(-3, 7, (6, 8))
    T, w = 2.0, 9.0

    def z(a):
        return (a - a.mean(1, keepdims=True)) / (a.std(1, ddof=1, keepdims=True) + 1e-7)

    want = w * np_kd_soft(z(s), z(t), T)
    m = LOSSES.get("ls_kd")(temperature=T, weight=w)
    got = m(Outputs(t64(s)), Outputs(t64(t)), make_ctx(np.zeros(6, int)))["ls_kd"]
    assert got.item() == pytest.approx(want, rel=1e-4)
    shifted = m(Outputs(t64(3 * s + 5)), Outputs(t64(t)), make_ctx(np.zeros(6, int)))["ls_kd"]
    assert shifted.item() == pytest.approx(want, rel=1e-3)  # invariant to the student's logit scale and shift
    assert want != pytest.approx(w * np_kd_soft(s, t, T), rel=1e-2)


def test_kd_loss_gives_no_gradient_to_teacher_logits(rng):
    from kdrun.losses import kd_loss

    s, t = t64(rng.normal(size=(4, 5)), grad=True), t64(rng.normal(size=(4, 5)), grad=True)
    kd_loss(s, t, torch.tensor([0, 1, 2, 3]), 4.0, 0.9).backward()
    assert t.grad is None and s.grad is not None and s.grad.abs().sum() > 0


# ---------------------------------------------------------------- FitNet


def test_fitnet_regressor_and_mse(rng):
    fs, ft = rng.normal(size=(4, 3, 2, 2)), rng.normal(size=(4, 5, 2, 2))
    m = build("fitnet", [ft.shape], [fs.shape], weight=100.0)
    conv, bn, relu = m.adapters[0]
    assert isinstance(relu, torch.nn.ReLU)  # conv -> BN -> ReLU, as RepDistiller's / mdistiller's ConvReg
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(rng.normal(size=5)))
        bn.bias.copy_(torch.tensor(rng.normal(size=5)))
    W = conv.weight.detach().numpy()[:, :, 0, 0].astype(np.float64)
    g, b = bn.weight.detach().numpy(), bn.bias.detach().numpy()
    y = np.zeros((4, 5, 2, 2))
    for n in range(4):
        for o in range(5):
            for i in range(3):
                y[n, o] += W[o, i] * fs[n, i]
    mu, var = y.mean(axis=(0, 2, 3)), y.var(axis=(0, 2, 3))  # BN in training mode: batch statistics
    y = (y - mu[None, :, None, None]) / np.sqrt(var[None, :, None, None] + bn.eps) * g[None, :, None, None] + b[
        None, :, None, None
    ]
    y = np.maximum(y, 0.0)
    want = 100.0 * ((y - ft) ** 2).mean()
    got = run(m, [t64(fs)], [t64(ft)], make_ctx(np.zeros(4, int)))["fitnet"]
    assert got.item() == pytest.approx(want, rel=1e-4)


def test_fitnet_interpolates_student_to_teacher_size():
    m = build("fitnet", [(2, 4, 8, 8)], [(2, 3, 4, 4)])
    out = run(m, [torch.randn(2, 3, 4, 4)], [torch.randn(2, 4, 8, 8)], make_ctx([0, 1]))
    assert torch.isfinite(out["fitnet"])


def test_fitnet_default_layer_is_the_middle_stage():
    m = LOSSES.get("fitnet")()
    assert m.default_layers(["stem", "stage1", "stage2", "stage3", "pre_logits"], ["stage1", "stage2", "stage3"]) == (
        ["stage2"],
        ["stage2"],
    )


# ---------------------------------------------------------------- AT


def np_attention(f, p=2):
    a = np.array(
        [
            [
                np.mean([abs(f[b, c, i, j]) ** p for c in range(f.shape[1])])
                for i in range(f.shape[2])
                for j in range(f.shape[3])
            ]
            for b in range(f.shape[0])
        ]
    )
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_at_matches_attention_maps_with_pooling(rng):
    s1, t1 = rng.normal(size=(3, 4, 4, 4)), rng.normal(size=(3, 6, 2, 2))
    s2, t2 = rng.normal(size=(3, 2, 3, 3)), rng.normal(size=(3, 5, 3, 3))
    s1_pooled = s1.reshape(3, 4, 2, 2, 2, 2).mean(axis=(3, 5))  # 2x2 average pooling to the teacher's 2x2
    want = 1000.0 * sum(((np_attention(a) - np_attention(b)) ** 2).mean() for a, b in [(s1_pooled, t1), (s2, t2)])
    m = build("at", [t1.shape, t2.shape], [s1.shape, s2.shape], weight=1000.0)
    got = run(m, [t64(s1), t64(s2)], [t64(t1), t64(t2)], make_ctx(np.zeros(3, int)))["at"]
    assert got.item() == pytest.approx(want, rel=1e-4)


def test_at_default_layers_are_all_shared_stages():
    m = LOSSES.get("at")()
    assert m.default_layers(["stem", "stage1", "stage2", "stage3"], ["stage1", "stage2", "stage3", "stage4"]) == (
        ["stage1", "stage2", "stage3"],
        ["stage1", "stage2", "stage3"],
    )


# ---------------------------------------------------------------- NST


def test_nst_matches_polynomial_mmd(rng):
    fs, ft = rng.normal(size=(2, 3, 2, 3)), rng.normal(size=(2, 4, 2, 3))
    total = 0.0
    for b in range(2):
        S = [np_normalize(fs[b, c].ravel()) for c in range(3)]
        T = [np_normalize(ft[b, c].ravel()) for c in range(4)]

        def k(X, Y):
            return np.mean([np.dot(x, y) ** 2 for x in X for y in Y])

        total += k(T, T) + k(S, S) - 2 * k(S, T)
    want = 50.0 * total / 2
    m = build("nst", [ft.shape], [fs.shape], weight=50.0)
    got = run(m, [t64(fs)], [t64(ft)], make_ctx([0, 0]))["nst"]
    assert got.item() == pytest.approx(want, rel=1e-4)


# ---------------------------------------------------------------- RKD


def np_rkd(x, y, wd, wa):
    B = len(x)

    def dist(f):
        d = np.array([[np.linalg.norm(f[i] - f[j]) for j in range(B)] for i in range(B)])
        return d / d[~np.eye(B, dtype=bool)].mean()

    def angle(f):
        out = np.zeros((B, B, B))
        for j in range(B):
            for i in range(B):
                for k in range(B):
                    if i != j and k != j:
                        out[j, i, k] = np.dot(np_normalize(f[i] - f[j]), np_normalize(f[k] - f[j]))
        return out

    return wd * np_huber(dist(x) - dist(y)).mean() + wa * np_huber(angle(x) - angle(y)).mean()


def test_rkd_matches_distance_and_angle(rng):
    x, y = rng.normal(size=(5, 4)), rng.normal(0, 3, (5, 6))
    m = build("rkd", [y.shape], [x.shape], t_names=["pre_logits"], s_names=["pre_logits"], w_dist=25.0, w_angle=50.0)
    got = run(m, [t64(x)], [t64(y)], make_ctx(np.zeros(5, int)))["rkd"]
    assert got.item() == pytest.approx(np_rkd(x, y, 25.0, 50.0), rel=1e-4)


# ---------------------------------------------------------------- SP


def test_sp_matches_normalised_gram(rng):
    fs, ft = rng.normal(size=(4, 3, 2, 2)), rng.normal(size=(4, 5, 2, 2))

    def gram(f):
        q = f.reshape(len(f), -1)
        g = q @ q.T
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    want = 3000.0 * ((gram(ft) - gram(fs)) ** 2).sum() / 16
    got = run(build("sp", [ft.shape], [fs.shape]), [t64(fs)], [t64(ft)], make_ctx(np.zeros(4, int)))["sp"]
    assert got.item() == pytest.approx(want, rel=1e-4)


# ---------------------------------------------------------------- PKT


def test_pkt_matches_conditional_probabilities(rng):
    x, y = rng.normal(size=(5, 4)), rng.normal(size=(5, 6))
    eps = 1e-7

    def probs(f):
        f = f / (np.linalg.norm(f, axis=1, keepdims=True) + eps)
        k = np.array([[(np.dot(a, b) + 1) / 2 for b in f] for a in f])
        return k / k.sum(1, keepdims=True)

    ps, pt = probs(x), probs(y)
    want = 30000.0 * np.mean(
        [[pt[i, j] * np.log((pt[i, j] + eps) / (ps[i, j] + eps)) for j in range(5)] for i in range(5)]
    )
    got = run(build("pkt", [y.shape], [x.shape]), [t64(x)], [t64(y)], make_ctx(np.zeros(5, int)))["pkt"]
    assert got.item() == pytest.approx(want, rel=1e-3)


# ---------------------------------------------------------------- CC


def test_cc_matches_embedded_correlation(rng):
    x, y = rng.normal(size=(5, 4)), rng.normal(size=(5, 6))
    m = build("cc", [y.shape], [x.shape], weight=0.02, embed_dim=3)
    es, et = m.adapters[0].linear, m.embed_t[0].linear
    fs = x @ es.weight.detach().numpy().T.astype(np.float64) + es.bias.detach().numpy()
    ft = y @ et.weight.detach().numpy().T.astype(np.float64) + et.bias.detach().numpy()
    d = np.abs(fs - ft)
    want = 0.02 * np.mean([sum(d[i - 1, k] * d[i, k] for k in range(3)) for i in range(1, 5)])
    got = run(m, [t64(x)], [t64(y)], make_ctx(np.zeros(5, int)))["cc"]
    assert got.item() == pytest.approx(want, rel=1e-4)


# ---------------------------------------------------------------- CRD


def test_crd_nce_memory_and_clamped_negatives(rng, monkeypatch):
    N, B, tau, mom = 10, 4, 0.07, 0.5
    x, y = rng.normal(size=(B, 4)), rng.normal(size=(B, 6))
    m = build("crd", [y.shape], [x.shape], num_samples=N, weight=0.8, embed_dim=3, nce_t=tau, nce_m=mom)
    assert m.k == N - 1  # 16384 negatives clamped to the training-set size
    neg = torch.tensor(rng.integers(0, N, (B, N - 1)))
    monkeypatch.setattr(m, "sample_negatives", lambda batch, device: neg)
    index = np.array([3, 7, 0, 9])
    mem_s, mem_t = m.memory_s.numpy().astype(np.float64).copy(), m.memory_t.numpy().astype(np.float64).copy()
    es, et = m.adapters[0].linear, m.embed_t.linear
    s = np_normalize(x @ es.weight.detach().numpy().T + es.bias.detach().numpy())
    t = np_normalize(y @ et.weight.detach().numpy().T + et.bias.detach().numpy())
    idx = np.concatenate([index[:, None], neg.numpy()], axis=1)
    K = N - 1

    def nce(anchor, memory):
        e = np.array([[np.exp(np.dot(anchor[b], memory[idx[b, k]]) / tau) for k in range(K + 1)] for b in range(B)])
        P = e / (e.mean() * N)
        noise = K / N
        pos = sum(np.log(P[b, 0] / (P[b, 0] + noise + 1e-7)) for b in range(B))
        negs = sum(np.log(noise / (P[b, k] + noise + 1e-7)) for b in range(B) for k in range(1, K + 1))
        return -(pos + negs) / B

    want = 0.8 * (nce(s, mem_t) + nce(t, mem_s))
    got = run(m, [t64(x)], [t64(y)], make_ctx(np.zeros(B, int), index=index, num_samples=N))["crd"]
    assert got.item() == pytest.approx(want, rel=1e-4)
    np.testing.assert_allclose(m.memory_s.numpy()[index], np_normalize(mom * mem_s[index] + (1 - mom) * s), atol=1e-5)
    np.testing.assert_allclose(m.memory_t.numpy()[index], np_normalize(mom * mem_t[index] + (1 - mom) * t), atol=1e-5)
    untouched = [i for i in range(N) if i not in index]
    np.testing.assert_allclose(m.memory_s.numpy()[untouched], mem_s[untouched], atol=1e-7)
    z = m.z.clone()
    run(m, [t64(x)], [t64(y)], make_ctx(np.zeros(B, int), index=index, num_samples=N))
    assert torch.equal(m.z, z)  # the normalising constants are fixed after the first batch


def test_crd_memory_update_keeps_m_of_the_old_slot(rng):
    """M[i] <- normalise(m * M[i] + (1 - m) * embedding_i) at m = 0.9: at the default 0.5 a swap of m and 1 - m
    would not show."""
    N, B, mom = 10, 4, 0.9
    x, y = rng.normal(size=(B, 4)), rng.normal(size=(B, 6))
    m = build("crd", [y.shape], [x.shape], num_samples=N, embed_dim=3, nce_m=mom)
    index = np.array([3, 7, 0, 9])
    mem_s, mem_t = m.memory_s.numpy().astype(np.float64).copy(), m.memory_t.numpy().astype(np.float64).copy()
    es, et = m.adapters[0].linear, m.embed_t.linear
    s = np_normalize(x @ es.weight.detach().numpy().T + es.bias.detach().numpy())
    t = np_normalize(y @ et.weight.detach().numpy().T + et.bias.detach().numpy())
    run(m, [t64(x)], [t64(y)], make_ctx(np.zeros(B, int), index=index, num_samples=N))
    for b, i in enumerate(index):
        want_s = [mom * mem_s[i, d] + (1 - mom) * s[b, d] for d in range(3)]
        want_t = [mom * mem_t[i, d] + (1 - mom) * t[b, d] for d in range(3)]
        np.testing.assert_allclose(m.memory_s.numpy()[i], np.array(want_s) / np.linalg.norm(want_s), atol=1e-5)
        np.testing.assert_allclose(m.memory_t.numpy()[i], np.array(want_t) / np.linalg.norm(want_t), atol=1e-5)
    untouched = [i for i in range(N) if i not in index]
    np.testing.assert_allclose(m.memory_t.numpy()[untouched], mem_t[untouched], atol=1e-7)


def test_crd_shared_negatives_equal_per_anchor_ones_drawn_alike(rng, monkeypatch):
    """negatives=shared scores one draw of K against the whole batch: the same loss, gradients and banks as
    per-anchor negatives that happen to be that draw for every anchor; and it draws a single row."""
    N, B, K = 40, 6, 9
    x, y = rng.normal(size=(B, 4)), rng.normal(size=(B, 6))
    neg = torch.tensor(rng.integers(0, N, (1, K)))
    index = np.array([3, 7, 0, 9, 21, 39])
    out = {}
    for mode in ("shared", "per_anchor"):
        torch.manual_seed(5)
        m = build("crd", [y.shape], [x.shape], num_samples=N, nce_k=K, embed_dim=3, negatives=mode)
        assert m.sample_negatives(B, "cpu").shape == ((1, K) if mode == "shared" else (B, K))
        monkeypatch.setattr(
            m, "sample_negatives", lambda b, device, mode=mode: neg if mode == "shared" else neg.expand(b, K)
        )
        xs = t64(x, grad=True)
        loss = run(m, [xs], [t64(y)], make_ctx(np.zeros(B, int), index=index, num_samples=N))["crd"]
        loss.backward()
        out[mode] = (loss.detach(), xs.grad, m.memory_s.clone(), m.memory_t.clone())
    for a, b in zip(out["shared"], out["per_anchor"], strict=True):
        torch.testing.assert_close(a, b)


def test_crd_keeps_its_memory_in_the_state_dict():
    m = build("crd", [(2, 6)], [(2, 4)], num_samples=50)
    assert {"memory_s", "memory_t", "z"} <= set(m.state_dict())
    assert m.memory_s.shape == (50, 128)


# ---------------------------------------------------------------- gradients

FEATURE_SHAPES = {
    "fitnet": ([(4, 8, 4, 4)], [(4, 6, 8, 8)]),
    "at": ([(4, 8, 4, 4)], [(4, 6, 8, 8)]),
    "nst": ([(4, 8, 4, 4)], [(4, 6, 8, 8)]),
    "rkd": ([(4, 10)], [(4, 7)]),
    "sp": ([(4, 8, 4, 4)], [(4, 6, 4, 4)]),
    "pkt": ([(4, 10)], [(4, 7)]),
    "cc": ([(4, 10)], [(4, 7)]),
    "crd": ([(4, 10)], [(4, 7)]),
    "vid": ([(4, 8, 4, 4)], [(4, 6, 8, 8)]),
    "kdsvd": ([(4, 6, 4, 4), (4, 6, 2, 2)], [(4, 6, 4, 4), (4, 6, 2, 2)]),
    "reviewkd": ([(4, 8, 4, 4), (4, 10)], [(4, 6, 8, 8), (4, 7)]),
}
HAS_ADAPTERS = {"fitnet", "cc", "crd", "vid", "reviewkd"}


@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_feature_gradients_reach_student_and_adapters_not_teacher(name):
    t_shapes, s_shapes = FEATURE_SHAPES[name]
    m = build(name, t_shapes, s_shapes, num_samples=32)
    s_feats = [torch.randn(*s, requires_grad=True) for s in s_shapes]
    t_feats = [torch.randn(*s, requires_grad=True) for s in t_shapes]
    out = run(m, s_feats, t_feats, make_ctx([0, 1, 2, 3], index=[1, 5, 9, 30], num_samples=32))
    assert set(out) == {name}
    sum(out.values()).backward()
    for f in s_feats:
        assert f.grad is not None and f.grad.abs().sum() > 0
    for f in t_feats:
        assert f.grad is None
    params = list(m.parameters())
    assert bool(params) == (name in HAS_ADAPTERS)
    for p in params:
        assert p.grad is not None
    if params:
        assert any(p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize("name", LOGIT_METHODS)
def test_logit_gradients_reach_student_not_teacher(name):
    s, t = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5, requires_grad=True)
    m = LOSSES.get(name)()
    assert not m.needs_teacher_features
    out = m(Outputs(s), Outputs(t), make_ctx([0, 1, 2, 3, 4, 0], epoch=30, epochs=40))
    sum(out.values()).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


# ---------------------------------------------------------------- layer and value errors


def test_unbridgeable_shapes_raise_config_error():
    with pytest.raises(ConfigError, match=r"^loss\.layers: teacher stage3 \[64,8,8\] and student pre_logits \[32\]"):
        build("fitnet", [(2, 64, 8, 8)], [(2, 32)], t_names=["stage3"], s_names=["pre_logits"])
    with pytest.raises(ConfigError, match=r"^loss\.layers: .*attention transfer needs two feature maps"):
        build("at", [(2, 64)], [(2, 32)], t_names=["pre_logits"], s_names=["pre_logits"])
    with pytest.raises(ConfigError, match=r"^loss\.layers: .*neuron selectivity"):
        build("nst", [(2, 64, 4, 4)], [(2, 32)])


def test_bad_layer_config_raises_config_error():
    with pytest.raises(ConfigError, match=r"^loss\.layers: 2 teacher and 1 student layers"):
        build("at", [(2, 4, 4, 4), (2, 4, 2, 2)], [(2, 4, 4, 4)])
    with pytest.raises(ConfigError, match=r"^loss\.layers: 2 layer pairs; crd takes at most 1"):
        build("crd", [(2, 4), (2, 4)], [(2, 4), (2, 4)])
    with pytest.raises(ConfigError, match=r"^loss\.layers\.techer: unknown key"):
        LOSSES.get("at")(layers={"techer": ["stage1"]})
    with pytest.raises(ConfigError, match=r"^loss\.layers: .*pre_logits"):
        LOSSES.get("rkd")().default_layers(["stage1"], ["stage1"])
    with pytest.raises(ConfigError, match=r"^loss\.layers: the models share no stage"):
        LOSSES.get("at")().default_layers(["stage1"], ["block1"])


def test_a_single_layer_name_is_one_layer():
    assert LOSSES.get("at")(layers={"teacher": "stage2", "student": "stage2"}).teacher_layers == ["stage2"]


@pytest.mark.parametrize(
    "name, kwargs, key",
    [
        ("dkd", {"beta": -1.0}, "loss.beta"),
        ("dist", {"tau": 0.0}, "loss.tau"),
        ("at", {"weight": -1.0}, "loss.weight"),
        ("crd", {"nce_m": 1.5}, "loss.nce_m"),
        ("crd", {"negatives": "hard"}, "loss.negatives"),
        ("cc", {"embed_dim": 0}, "loss.embed_dim"),
        ("rkd", {"ce_weight": -1.0}, "loss.ce_weight"),
    ],
)
def test_bad_values_name_their_key(name, kwargs, key):
    with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.") + "="):
        LOSSES.get(name)(**kwargs)


# ---------------------------------------------------------------- combo


def test_combo_logs_each_term_splits_features_and_sums(rng):
    combo = LOSSES.get("combo")(
        terms={
            "kd": {"temperature": 4.0, "alpha": 0.9},
            "at": {"weight": 1000.0, "layers": {"teacher": ["stage2", "stage3"], "student": ["stage2", "stage3"]}},
            "fitnet": {},
        },
        ce_weight=0.5,
    )
    assert combo.needs_teacher_features and combo.ce_weight == 0.5  # not kd's 1 - alpha
    assert combo.teacher_layers == []  # fitnet still needs its default layer
    t_layers, s_layers = combo.default_layers(["stem", "stage1", "stage2", "stage3"], ["stage1", "stage2", "stage3"])
    assert t_layers == s_layers == ["stage2", "stage3", "stage2"]
    combo.teacher_layers, combo.student_layers = t_layers, s_layers  # what the pipeline does
    assert combo.teacher_layers == t_layers
    shapes = [(3, 8, 4, 4), (3, 16, 2, 2), (3, 8, 4, 4), (3, 4, 4, 4), (3, 6, 2, 2), (3, 4, 4, 4)]
    t2, t3, t2f, s2, s3, s2f = (rng.normal(size=sh) for sh in shapes)  # *f: fitnet's slice, other values
    combo.build([t2.shape, t3.shape, t2f.shape], [s2.shape, s3.shape, s2f.shape], 10)
    s_log, t_log = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    out = combo(
        Outputs(t64(s_log), [t64(s2), t64(s3), t64(s2f)]),
        Outputs(t64(t_log), [t64(t2), t64(t3), t64(t2f)]),
        make_ctx([0, 1, 2]),
    )
    assert set(out) == {"kd", "at", "fitnet"}
    want_kd = 0.9 * np_kd_soft(s_log, t_log, 4.0)
    want_at = 1000.0 * sum(((np_attention(a) - np_attention(b)) ** 2).mean() for a, b in [(s2, t2), (s3, t3)])
    fitnet = combo.terms["fitnet"]
    want_fit = fitnet(Outputs(t64(s_log), [t64(s2f)]), Outputs(t64(t_log), [t64(t2f)]), make_ctx([0, 1, 2]))["fitnet"]
    assert out["kd"].item() == pytest.approx(want_kd, rel=1e-5)
    assert out["at"].item() == pytest.approx(want_at, rel=1e-4)
    assert out["fitnet"].item() == pytest.approx(want_fit.item(), rel=1e-5)
    assert sum(out.values()).item() == pytest.approx(want_kd + want_at + want_fit.item(), rel=1e-4)
    assert len(list(combo.parameters())) == len(list(fitnet.parameters())) > 0


def test_combo_of_logit_methods_needs_no_teacher_features():
    combo = LOSSES.get("combo")(terms={"kd": {}, "dkd": {"warmup": 0}})
    assert not combo.needs_teacher_features and combo.teacher_layers == []
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    out = combo(Outputs(s), Outputs(t), make_ctx([0, 1, 2, 3]))
    assert set(out) == {"kd", "dkd"}


def test_combo_errors_name_their_key():
    with pytest.raises(ConfigError, match=r"^loss\.terms\.kdd: unknown KD method; valid: .*\bat\b.*\bkd\b"):
        LOSSES.get("combo")(terms={"kdd": {}})
    with pytest.raises(ConfigError, match=r"^loss\.terms\.kd\.tempreature: not a parameter"):
        LOSSES.get("combo")(terms={"kd": {"tempreature": 4}})
    with pytest.raises(ConfigError, match=r"^loss\.terms\.at\.p="):
        LOSSES.get("combo")(terms={"at": {"p": -1}})
    with pytest.raises(ConfigError, match=r"^loss\.terms\.kd\.ce_weight"):
        LOSSES.get("combo")(terms={"kd": {"ce_weight": 0.1}})
    with pytest.raises(ConfigError, match=r"^loss\.terms:"):
        LOSSES.get("combo")(terms={})
    combo = LOSSES.get("combo")(terms={"at": {"layers": {"teacher": ["pre_logits"], "student": ["pre_logits"]}}})
    with pytest.raises(ConfigError, match=r"^loss\.terms\.at\.layers: teacher pre_logits \[8\]"):
        combo.build([torch.Size([2, 8])], [torch.Size([2, 4])], 10)


# ---------------------------------------------------------------- configs


def loss_yamls():
    root = resources.files("kdrun.configs") / "loss"
    return sorted(p.name for p in root.iterdir() if p.name.endswith(".yaml"))


def test_every_method_has_a_yaml():
    assert {n[:-5] for n in loss_yamls()} == set(LOSSES.names())


@pytest.mark.parametrize("fname", loss_yamls())
def test_every_loss_yaml_builds_its_method(fname):
    kw = OmegaConf.to_container(OmegaConf.load(resources.files("kdrun.configs") / "loss" / fname), resolve=True)
    name = kw.pop("name")
    assert name == fname[:-5]
    m = LOSSES.get(name)(**kw)
    assert m.ce_weight >= 0


@pytest.mark.parametrize(
    "name, key, value",
    [
        ("kd", "temperature", 4.0),
        ("kd", "alpha", 0.9),
        ("dkd", "beta", 8.0),
        ("dkd", "warmup", 20),
        ("fitnet", "weight", 100.0),
        ("at", "weight", 1000.0),
        ("nst", "weight", 50.0),
        ("rkd", "w_dist", 25.0),
        ("rkd", "w_angle", 50.0),
        ("sp", "weight", 3000.0),
        ("pkt", "weight", 30000.0),
        ("cc", "weight", 0.02),
        ("crd", "weight", 0.8),
        ("crd", "nce_k", 16384),
        ("crd", "nce_t", 0.07),
        ("crd", "nce_m", 0.5),
        ("crd", "embed_dim", 128),
        ("crd", "negatives", "per_anchor"),
        ("vid", "weight", 1.0),
        ("vid", "init_pred_var", 5.0),
        ("vid", "eps", 1e-5),
        ("kdsvd", "weight", 1.0),
        ("kdsvd", "k", 1),
        ("reviewkd", "weight", 1.0),
        ("reviewkd", "warmup", 20),
        ("ofd", "weight", 0.001),
        ("ft", "weight", 200.0),
        ("ft", "k", 0.5),
        ("ft", "paraphraser_epochs", 30),
        ("fsp", "init_epochs", 30),
        ("ab", "init_epochs", 30),
        ("ab", "margin", 1.0),
    ],
)
def test_yaml_defaults_are_the_benchmark_ones(name, key, value):
    cfg = OmegaConf.load(resources.files("kdrun.configs") / "loss" / f"{name}.yaml")
    assert cfg[key] == value


# ---------------------------------------------------------------- with real models


@pytest.mark.parametrize("name", LOSSES.names())  # every registered method: a new one is covered with no list to edit
def test_method_runs_in_the_distill_stage(name):
    from kdrun.data.loader import Batch
    from kdrun.distill import Distill, probe_shapes
    from kdrun.models import build_model

    teacher = build_model("resnet20", 10, 1, 8)  # as it leaves its own training stage: train mode, with grads
    student = build_model("resnet8", 10, 1, 8)
    kw = OmegaConf.to_container(
        OmegaConf.load(resources.files("kdrun.configs") / "loss" / f"{name}.yaml"), resolve=True
    )
    kw.pop("name")
    method = LOSSES.get(name)(**kw)
    method.teacher_layers, method.student_layers = method.default_layers(
        list(teacher.feature_points), list(student.feature_points)
    )
    x = torch.randn(6, 1, 8, 8)
    method.build(
        probe_shapes(teacher, method.teacher_layers, x[:2]), probe_shapes(student, method.student_layers, x[:2]), 40
    )
    method.bind_teacher(teacher)
    for pre in method.pre_stages(teacher, student):  # as the pipeline leaves them (e.g. FT's paraphraser frozen)
        with pre.objective:
            pass
    teacher.train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    objective = Distill(method, student, epochs=2, num_samples=40, teacher=teacher)
    batch = Batch(x, torch.randint(0, 10, (6,)), torch.arange(6), torch.zeros(6, dtype=torch.long))
    with objective:
        terms = objective(objective.module, batch, 0)
    # Distill keeps the teacher frozen: eval mode (BatchNorm statistics untouched) and no autograd
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    ce_only = name in ("fsp", "ab")  # their distillation is their init stage; the student stage is CE only
    assert "ce" in terms and len(terms) >= (1 if ce_only else 2) and all(torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    # the method's own trainable parameters (adapters, embeddings) train with the student
    assert all(p.grad is not None for p in method.parameters() if p.requires_grad), name


@pytest.mark.parametrize("precision, dtype", [(None, torch.float32), ("bf16", torch.bfloat16)])
def test_online_teacher_runs_at_teacher_precision(precision, dtype):
    """``teacher.precision``: the online teacher's forward has its own autocast, whatever the student's step uses."""
    from kdrun.data.loader import Batch
    from kdrun.distill import Distill
    from kdrun.models import build_model

    teacher = build_model("resnet8", 10, 1, 8)  # Distill freezes it
    student = build_model("resnet8", 10, 1, 8)
    method = LOSSES.get("kd")(temperature=4.0, alpha=0.9)
    objective = Distill(method, student, epochs=1, num_samples=6, teacher=teacher, teacher_precision=precision)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    batch = Batch(x, y, torch.arange(6), torch.zeros(6, dtype=torch.long))
    with objective:
        assert objective.teacher_outputs(batch).logits.dtype == dtype


def _validated(*overrides):
    from hydra import compose, initialize_config_module

    from kdrun.config import validate

    with initialize_config_module(config_module="kdrun.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    validate(cfg)
    return cfg


def test_alpha_range_is_the_methods_own():
    """KD's alpha mixes soft and hard terms (in [0, 1]); DKD's alpha is a TCKD weight (paper: 1; > 1 is valid)."""
    assert _validated("loss=dkd", "loss.alpha=2.0").loss.alpha == 2.0
    with pytest.raises(ConfigError, match=r"^loss\.alpha=-1: must be a number >= 0"):
        _validated("loss=dkd", "loss.alpha=-1")
    with pytest.raises(ConfigError, match=r"^loss\.alpha=1\.5: must be a number in \[0, 1\]$"):
        _validated("loss.alpha=1.5")
    with pytest.raises(ConfigError, match=r"^loss\.terms\.kd\.alpha=1\.5: must be a number in \[0, 1\]$"):
        LOSSES.get("combo")(terms={"kd": {"alpha": 1.5}})
    assert LOSSES.get("dkd")(alpha=2.0).alpha == 2.0


def test_default_stages_are_stage_outputs_not_their_variants():
    points = ["stem", "stage1", "stage1_preact", "stage2", "stage2_preact", "pre_logits"]
    assert LOSSES.get("at")().default_layers(points, points) == (["stage1", "stage2"], ["stage1", "stage2"])
    assert LOSSES.get("sp")().default_layers(points, points) == (["stage2"], ["stage2"])


@pytest.mark.parametrize("name", ["vid", "kdsvd", "ofd", "reviewkd", "ft", "fsp", "ab"])
def test_new_methods_compose_with_kd_in_a_combo(name):
    from kdrun.distill import probe_shapes
    from kdrun.models import build_model

    teacher = build_model("resnet20", 10, 1, 8).eval().requires_grad_(False)
    student = build_model("resnet8", 10, 1, 8)
    combo = LOSSES.get("combo")(terms={"kd": {"alpha": 1.0}, name: {}})
    combo.teacher_layers, combo.student_layers = combo.default_layers(
        list(teacher.feature_points), list(student.feature_points)
    )
    x = torch.randn(6, 1, 8, 8)
    combo.build(
        probe_shapes(teacher, combo.teacher_layers, x[:2]), probe_shapes(student, combo.student_layers, x[:2]), 40
    )
    combo.bind_teacher(teacher)
    assert len(combo.pre_stages(teacher, student)) == (1 if name in ("ft", "fsp", "ab") else 0)
    from kdrun.models.features import FeatureTap

    with FeatureTap(teacher, combo.teacher_layers) as tt, FeatureTap(student, combo.student_layers) as st:
        t_logits, s_logits = teacher(x), student(x)
    out = combo(
        Outputs(s_logits, [st.features[n] for n in combo.student_layers]),
        Outputs(t_logits, [tt.features[n] for n in combo.teacher_layers]),
        make_ctx([0] * 6, num_samples=40),
    )
    assert "kd" in out and all(torch.isfinite(v) for v in out.values())
    assert (name in out) == (name not in ("fsp", "ab"))  # their student stage adds no term


def test_a_methods_pre_stage_is_a_resumable_stage_of_the_run(kdrun, tmp_path):
    """AB's init stage killed mid-way and resumed ends exactly like an uninterrupted run."""
    import signal

    args = [
        "loss=ab",
        "loss.init_epochs=2",
        "teacher=resnet8",
        "student=resnet8",
        "trainer.teacher_epochs=1",
        "trainer.epochs=1",
        "trainer.batch_size=128",
        "trainer.checkpoint_every_steps=2",
        "trainer.deterministic=true",
        "trainer.latency=false",
        "store.enabled=false",
        "baseline=false",
    ]
    clean, run = tmp_path / "clean", tmp_path / "run"
    p = kdrun("train", *args, f"hydra.run.dir={clean}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "student_init epoch=2" in (clean / "train.log").read_text()
    p = kdrun("train", *args, f"hydra.run.dir={run}", env={"KDRUN_KILL_AT": "student_init:3"})
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    p = kdrun("train", f"resume={run}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "student_init: resuming from" in p.stderr
    want = torch.load(clean / "checkpoints" / "student.pt", weights_only=True)["model"]
    got = torch.load(run / "checkpoints" / "student.pt", weights_only=True)["model"]
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize(
    "loss",
    [
        ["loss=ab", "loss.init_epochs=1"],
        ["loss=ft", "loss.paraphraser_epochs=1"],
        ["loss=combo", "~loss.terms", "+loss.terms={ab: {init_epochs: 1}, fsp: {init_epochs: 1}}"],
    ],
    ids=["ab", "ft", "ab+fsp"],
)
def test_pre_stages_run_beside_a_validation_split(kdrun, tmp_path, loss):
    """A pre-stage trains no classifier, so it is not validated (it used to crash with trainer.val_fraction > 0);
    a combo's pre-stages are named by their term, so two terms' initialisations are two stages."""
    run = tmp_path / "run"
    args = ["trainer=smoke", "teacher=resnet14", "student=resnet8", "trainer.val_fraction=0.1", *loss]
    p = kdrun("train", *args, "store.enabled=false", "baseline=false", f"hydra.run.dir={run}")
    assert p.returncode == 0, p.stderr[-2000:]
    stages = sorted(f.name for f in (run / "checkpoints").glob("student_*_last.pt"))
    want = {"ab": ["student_init_last.pt"], "ft": ["student_paraphraser_last.pt"]}
    assert stages == want.get(loss[0][5:], ["student_ab_init_last.pt", "student_fsp_init_last.pt"])
    assert "val_top1" not in (run / f"metrics_{stages[0][:-8]}.csv").read_text().splitlines()[0]


def test_trainer_pre_stage_epochs_caps_the_methods_own_stages(kdrun, tmp_path):
    """trainer=smoke shortens FT's 30-epoch paraphraser stage (loss.paraphraser_epochs) like every other stage."""
    run = tmp_path / "run"
    args = ["trainer=smoke", "teacher=resnet14", "student=resnet8", "loss=ft", "trainer.latency=false"]
    p = kdrun("train", *args, "store.enabled=false", "baseline=false", f"hydra.run.dir={run}")
    assert p.returncode == 0, p.stderr[-2000:]
    rows = (run / "metrics_student_paraphraser.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == ["1"]


@pytest.mark.parametrize(
    "student_name, post_relu", [("vgg8", False), ("shufflenet_v2_cifar", False), ("resnet18", True)]
)
def test_ab_and_ofd_say_when_a_student_has_no_pre_activation_features(caplog, monkeypatch, student_name, post_relu):
    from kdrun.losses import base
    from kdrun.losses.base import preact_stages

    monkeypatch.setattr(base, "_SAID", set())  # said once a process: not yet in this one (other tests ran here)
    from kdrun.models import build_model

    teacher, student = build_model("resnet32x4", 10, 3, 32), build_model(student_name, 10, 3, 32)
    with caplog.at_level("WARNING", logger="kdrun"):
        _, layers = preact_stages("ofd", list(teacher.feature_points), list(student.feature_points))
    assert all(n.endswith("_preact") for n in layers) != post_relu
    assert ("ofd: the student has no pre-activation point (stageN_preact) for stage1" in caplog.text) == post_relu
    caplog.clear()
    with caplog.at_level("WARNING", logger="kdrun"):  # said once a process (the checks, then the run)
        preact_stages("ofd", list(teacher.feature_points), list(student.feature_points))
    assert "pre-activation" not in caplog.text


@pytest.mark.parametrize(
    "teacher_name, student_name",
    [
        ("resnet20", "resnet8"),
        ("wrn_16_2", "wrn_16_1"),
        ("resnet20", "mbv2_tiny"),
        ("vgg13", "mbv2_cifar"),  # two CIFAR-100 presets' pairs, refused before their teachers had preact points
        ("resnet50_cifar", "mbv2_cifar"),
        ("shufflenet_v1", "shufflenet_v2_cifar"),
    ],
)
def test_ofd_margins_come_from_the_bn_before_each_teacher_preactivation(teacher_name, student_name):
    from kdrun.distill import probe_shapes
    from kdrun.losses.ofd import margin_from_bn
    from kdrun.models import build_model

    teacher = build_model(teacher_name, 10, 3, 32).eval()
    student = build_model(student_name, 10, 3, 32)
    m = LOSSES.get("ofd")()
    m.teacher_layers, m.student_layers = m.default_layers(list(teacher.feature_points), list(student.feature_points))
    assert all(n.endswith("_preact") for n in m.teacher_layers)
    x = torch.randn(2, 3, 32, 32)
    t_shapes = probe_shapes(teacher, m.teacher_layers, x)
    m.build(t_shapes, probe_shapes(student, m.student_layers, x), 10)
    modules = dict(teacher.named_modules())
    for bn_path in teacher.preact_bn.values():
        with torch.no_grad():
            modules[bn_path].weight.uniform_(0.5, 2)
            modules[bn_path].bias.normal_()
    m.bind_teacher(teacher)
    for i, (name, shape) in enumerate(zip(m.teacher_layers, t_shapes)):
        bn = modules[teacher.preact_bn[name]]
        assert bn.num_features == shape[1]
        torch.testing.assert_close(m._margin(i), margin_from_bn(bn))
        assert (m._margin(i) < 0).all()  # the expectation of a negative response
