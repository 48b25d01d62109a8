# Run OUTSIDE the package, against the official code (docs/methods_dynacl_air.md, "Validation").
# OFFICIAL_ROOT (default /tmp/e) must hold: dynacl/ (PKU-ML/DYNACL @7d143db, `git archive`), air/
# (GodXuxilie/Enhancing_ACL_via_AIR @15cf0a7), pkgs/kmeans_pytorch (the kmeans-pytorch 0.3 wheel, unzipped),
# stubs/ (autoattack, robustbench.data and a `utils` re-exporting finetuning_utils.NormalizeByChannelMeanStd:
# never called during these checks) and an empty run/ folder. Python: the advfast venv.
"""Run GodXuxilie/Enhancing_ACL_via_AIR pretraining.main()/get_trainset()/train() and AIR.AIR_Loss on the
CPU (stubbed data/CUDA), plus kmeans_pytorch 0.3 and DynACL/AIR TRADES losses, against advfast and the
transcriptions in tests/test_dynacl_air_parts.py."""
import os, sys, types, importlib.util
ROOT = os.environ.get('OFFICIAL_ROOT', '/tmp/e')
import torch, torch.nn as nn, torch.nn.functional as F
torch.Tensor.cuda = lambda self, *a, **k: self
torch.nn.Module.cuda = lambda self, *a, **k: self
os.chdir(ROOT + '/run')
from advfast.data import strength_schedule as ss
from advfast.losses.air import air_regularizers, air_objective
from advfast.ops import nt_xent
spec = importlib.util.spec_from_file_location('t', os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'tests', 'test_dynacl_air_parts.py'))
t = importlib.util.module_from_spec(spec); spec.loader.exec_module(t)

# ---- 1. AIR schedule through the real main/train ------------------------------------------------
sys.path.insert(0, ROOT + '/stubs'); sys.path.insert(0, ROOT + '/air')
def run_air(epochs, dyn):
    sys.argv = ['pretraining.py', f'air_{epochs}_{dyn}', '--ACL_DS', '--epochs', str(epochs)] + (['--DynAug'] if dyn else [])
    sys.modules.pop('pretraining', None)
    import pretraining as mod
    class FakeDS(torch.utils.data.Dataset):
        def __init__(self, transform=None, **kw): self.transform = transform
        def __len__(self): return 4
    mod.CustomCIFAR10 = FakeDS
    mod.save_checkpoint = lambda *a, **k: None
    mod.PGD_contrastive = lambda model, x, **k: x
    rec = {}
    class FakeLoss:
        def __init__(self, **kw): rec['lambdas'] = (kw['lambda1'], kw['lambda2'], kw['temperature'])
        def __call__(self, zi, zj, zo, zia, zja, weight):
            rec['w'] = weight; z = torch.zeros((), requires_grad=True); return z, 0., 0., 0., 0.
    mod.AIR_Loss = FakeLoss
    class FakeModel:
        def train(self): return self
        def __call__(self, x, bn): return torch.zeros(x.shape[0], 3)
    class Opt:
        def zero_grad(self): pass
        def step(self): pass
    real_train = mod.train
    def train(loader, model, optimizer, scheduler, epoch, log, strength, LAMBDA):
        crop, flip, japply, gray, _ = loader.dataset.transform.transforms
        real_train([(torch.zeros(2, 2, 3, 4, 4), torch.zeros(2, 3, 4, 4))], FakeModel(), Opt(),
                   types.SimpleNamespace(step=lambda: None), epoch, log, strength, LAMBDA)
        rec[epoch] = dict(strength=strength, w=rec['w'], crop_scale=tuple(crop.scale), interp=crop.interpolation.value,
                          jitter_p=japply.p, gray_p=gray.p, brightness=tuple(japply.transforms[0].brightness),
                          hue=tuple(japply.transforms[0].hue))
    mod.train = train
    import builtins; real_print = builtins.print; builtins.print = lambda *a, **k: None
    try: mod.main()
    finally: builtins.print = real_print
    return rec

for dyn in (True, False):
    rec = run_air(1000, dyn)
    for e in range(1, 1001):
        r = rec[e]; s = ss.air_strength(e, 1000, dyn); p = ss.strength_params(s)
        assert r['strength'] == s and r['w'] == ss.air_adv_weight(s) if dyn else r['w'] == 0, (e, r)
        assert r['crop_scale'] == p['crop_scale'] and r['interp'] == 'bicubic', (e, r)
        assert r['jitter_p'] == p['jitter_p'] and r['gray_p'] == p['gray_p'], (e, r)
        assert r['brightness'] == (1 - p['brightness'], 1 + p['brightness']) and r['hue'] == (-p['hue'], p['hue']), (e, r)
        ref = t._official_air_run(1000, dyn)[e]
        assert (r['strength'], r['w']) == ref, (e, r, ref)
    assert rec['lambdas'] == (0.5, 0.5, 0.5)
    print(f'AIR schedule DynAug={dyn}: 1000 epochs match (strength, weight, ops bit-equal; bicubic crop); '
          f'test transcription equal')

# ---- 2. AIR_Loss ----------------------------------------------------------------------------------
from AIR import AIR_Loss
worst = {}
for trial in range(20):
    g = torch.Generator().manual_seed(trial)
    b = [torch.randn(8 + trial % 5, 7, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(5)]
    w = [0.0, ss.air_adv_weight(0.05), ss.air_adv_weight(0.5)][trial % 3]
    real = AIR_Loss(normalize=True, temperature=0.5, lambda1=0.5, lambda2=0.5)(*b, w)
    real_terms = [real[0]] + [x.to(torch.float64) for x in real[1:]]
    ours = t._ours_total(*b, w)
    tr = t._official_air_loss(*b, weight=w)
    for name, a, bb, c in zip(('total', 'nat', 'adv', 'SIR', 'AIR'), ours, real_terms, tr):
        worst[name] = max(worst.get(name, 0), abs(a.item() - bb.item()), abs(c.item() - bb.item()))
    g_real = torch.autograd.grad(real[0], b)
    g_ours = torch.autograd.grad(ours[0], b)
    g_tr = torch.autograd.grad(tr[0], b)
    worst['grad'] = max(worst.get('grad', 0), *[(x - y).abs().max().item() for x, y in zip(g_ours, g_real)],
                        *[(x - y).abs().max().item() for x, y in zip(g_tr, g_real)])
print('AIR_Loss (20 random float64 batches, B 8-12, D 7, w in {0, 0.633, 0.333}): max |advfast - official| and '
      '|transcription - official|:', {k: f'{v:.1e}' for k, v in worst.items()})

# ---- 3. kmeans_pytorch 0.3 from given initial centres ----------------------------------------------
sys.path.insert(0, ROOT + '/pkgs')
import kmeans_pytorch
for seed in range(5):
    x = t._overlapping_blobs(k=4, seed=seed).float()
    init = t._kmeans_pp(x.double(), 4, (x.double() ** 2).sum(1), torch.Generator().manual_seed(seed), 16384).float()
    kmeans_pytorch.initialize = lambda X, num_clusters, init=init: init.clone()
    import builtins; real_print = builtins.print; builtins.print = lambda *a, **k: None
    try: lab, cen = kmeans_pytorch.kmeans(X=x, num_clusters=4, distance='euclidean', tol=1e-4)
    finally: builtins.print = real_print
    lab2, cen2 = t._official_kmeans_from(x, init, tol=1e-4)
    assert torch.equal(lab, lab2) and torch.allclose(cen, cen2, atol=1e-6), seed
    ours = t.cluster_pseudo_labels(x.double(), 4, seed=seed, tol=0.0)
    print(f'kmeans_pytorch seed {seed}: labels equal to the transcription; objective official '
          f'{t.within_cluster_ss(x.double(), lab, 4):.6f} advfast {ours.objective:.6f} labels equal {torch.equal(lab, ours.labels)}')

# ---- 4. TRADES in LPAFT (no random start) vs LP-AFF (0.001 randn start) ---------------------------
sys.path.remove(ROOT + '/air'); sys.path.insert(0, ROOT + '/dynacl')
for m in [k for k in list(sys.modules) if k in ('utils', 'models') or k.startswith('models.')]:
    sys.modules.pop(m)
spec = importlib.util.spec_from_file_location('dyn_utils', ROOT + '/dynacl/utils.py')
du = importlib.util.module_from_spec(spec); spec.loader.exec_module(du)
spec = importlib.util.spec_from_file_location('air_fu', ROOT + '/air/finetuning_utils.py')
au = importlib.util.module_from_spec(spec); spec.loader.exec_module(au)
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                    nn.Flatten(), nn.Linear(8, 10)).double()
x = torch.rand(16, 3, 8, 8, dtype=torch.float64); y = torch.randint(0, 10, (16,))
grads = []
real_grad = torch.autograd.grad
def rec_grad(*a, **k):
    g = real_grad(*a, **k); grads.append((g[0].abs().max().item(), (g[0] != 0).double().mean().item())); return g
du.torch.autograd.grad = rec_grad
import warnings; warnings.simplefilter('ignore')
opt = torch.optim.SGD(net.parameters(), lr=0.1)
loss = du.trades_loss(net, x, y, opt, perturb_steps=10)
net.train(); ce = F.cross_entropy(net(x), y)
print(f'DynACL utils.trades_loss (LPAFT/test_AFF, from x itself), float64: step-1 input grad max {grads[0][0]:.1e} '
      f'(nonzero on {100*grads[0][1]:.0f}% of pixels: rounding of log_softmax vs softmax), steps 2-10 max '
      f'{max(g for g, _ in grads[1:]):.1e}; loss - CE(clean) = {(loss - ce).item():.2e}')
for dt in (torch.float32,):
    grads.clear(); net32 = net.float()
    du.trades_loss(net32, x.float(), y, opt, perturb_steps=10)
    print(f'  same in float32: step-1 grad max {grads[0][0]:.1e}, nonzero on {100*grads[0][1]:.0f}% of pixels')
    net.double()
class Dual(nn.Module):
    def __init__(self):
        super().__init__(); self.net = net
    def forward(self, x, bn_name='normal'): return self.net(x)
grads.clear()
loss = au.trades_loss_dual(Dual(), x, y, opt, natural_mode='pgd')
print(f'AIR finetuning_utils.trades_loss_dual (0.001 randn start): step-1 grad max {grads[0][0]:.1e}, nonzero on {100*grads[0][1]:.0f}%')
du.torch.autograd.grad = real_grad
