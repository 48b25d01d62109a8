# Run OUTSIDE the package, against the official code (docs/methods_dynacl_air.md, "Validation").
# OFFICIAL_ROOT (default /tmp/e) must hold: dynacl/ (PKU-ML/DYNACL @7d143db, `git archive`), air/
# (GodXuxilie/Enhancing_ACL_via_AIR @15cf0a7), pkgs/kmeans_pytorch (the kmeans-pytorch 0.3 wheel, unzipped),
# stubs/ (autoattack, robustbench.data and a `utils` re-exporting finetuning_utils.NormalizeByChannelMeanStd:
# never called during these checks) and an empty run/ folder. Python: the advfast venv.
"""Run PKU-ML/DYNACL train_DynACL.main()/reload()/train() on the CPU with stubbed data, model calls and
CUDA, recording the strength (from the real transforms reload builds) and weight_adv (from the real
train's loss) per epoch; compare with advfast.data.strength_schedule."""
import os, sys, types
import torch
ROOT = os.environ.get('OFFICIAL_ROOT', '/tmp/e')
sys.path.insert(0, ROOT + '/dynacl'); os.chdir(ROOT + '/run')
torch.Tensor.cuda = lambda self, *a, **k: self
torch.nn.Module.cuda = lambda self, *a, **k: self
from advfast.data import strength_schedule as ss

def run(epochs, K, resume_from=None):
    sys.argv = ['train_DynACL.py', '--experiment', f'v{epochs}_{K}_{resume_from}', '--epochs', str(epochs),
                '--reload_frequency', str(K), '--val_frequency', str(10**6)] + (['--resume'] if resume_from else [])
    for m in ('train_DynACL',):
        sys.modules.pop(m, None)
    import train_DynACL as mod
    class FakeDS(torch.utils.data.Dataset):
        def __init__(self, transform=None, **kw): self.transform = transform
        def __len__(self): return 4
    mod.CustomCIFAR10 = FakeDS
    mod.datasets = types.SimpleNamespace(CIFAR10=FakeDS)
    mod.save_checkpoint = lambda *a, **k: None
    mod.PGD_contrastive = lambda model, x, iters: x
    mod.nt_xent = lambda f: f
    if resume_from:
        save_dir = os.path.join('checkpoints', mod.args.experiment); os.makedirs(save_dir, exist_ok=True)
        real_load = torch.load
        mod.torch.load = lambda path, *a, **k: {'epoch': resume_from - 1, 'state_dict': {},
                                                 'optim': captured['opt'].state_dict()}
    captured, rec = {}, {}
    real_train = mod.train
    class FakeModel:
        def train(self): return self
        def __call__(self, x, bn, swap=True):  # marker features: clean 1, adversarial 0
            return torch.tensor(1.0 if bn == 'normal' else 0.0, dtype=torch.float64, requires_grad=True)
        def _momentum_update_encoder_k(self): pass
    class Meter:
        def __init__(self): self.val = self.avg = 0.0
        def reset(self): pass
        def update(self, v, n=None):
            if n is not None: rec['loss'] = v
    mod.AverageMeter = Meter
    class FakeOpt:
        def zero_grad(self): pass
        def step(self): pass
    def train(train_loader, model, optimizer, scheduler, epoch, log, num_classes):
        tf = train_loader.dataset.transform
        crop, flip, japply, gray, _ = tf.transforms
        s_from_crop = (1.0 - crop.scale[0]) / 0.9
        inputs = torch.zeros(2, 2, 3, 4, 4)
        real_train([inputs], FakeModel(), FakeOpt(), types.SimpleNamespace(step=lambda: None), epoch, log, num_classes)
        w = 2 - 2 * rec['loss']   # loss = ((2-w)*1 + w*0)/2
        rec[epoch] = dict(crop_scale=tuple(crop.scale), jitter_p=japply.p, gray_p=gray.p,
                          brightness=tuple(japply.transforms[0].brightness), hue=tuple(japply.transforms[0].hue), w=w,
                          interp=crop.interpolation.value)
    mod.train = train
    if resume_from:  # capture the real model/optimizer main builds, for the fake checkpoint
        real_lars = mod.LARS
        def lars(params, **kw):
            params = list(params); o = real_lars(params, **kw); captured['opt'] = o; return o
        mod.LARS = lars
        real_m = mod.resnet18_momentum if hasattr(mod, 'resnet18_momentum') else None
        real_lsd = torch.nn.Module.load_state_dict
        torch.nn.Module.load_state_dict = lambda self, sd, *a, **k: None  # the fake checkpoint holds no weights
    mod.main()
    if resume_from:
        torch.nn.Module.load_state_dict = real_lsd; mod.torch.load = real_load
    return rec

def check(epochs, K, resume_from=None):
    rec = run(epochs, K, resume_from)
    n = 0
    for e in range(resume_from or 1, epochs + 1):
        r = rec[e]; s = ss.dynacl_strength(e, epochs, K, resumed_at=resume_from)
        p = ss.strength_params(s)
        assert r['crop_scale'] == p['crop_scale'], (e, r, p)
        assert r['jitter_p'] == p['jitter_p'] and r['gray_p'] == p['gray_p'], (e, r, p)
        assert r['brightness'] == (1 - p['brightness'], 1 + p['brightness']), (e, r, p)
        assert r['hue'] == (-p['hue'], p['hue']), (e, r, p)
        assert r['interp'] == 'bilinear'
        assert abs(r['w'] - ss.dynacl_adv_weight(e, epochs, K)) < 1e-15, (e, r['w'])
        n += 1
    print(f'DynACL E={epochs} K={K} resume={resume_from}: {n} epochs match (strength ops bit-equal, w within 1e-15)')

check(1000, 50)
check(10, ss.scaled_step(10, 5))
check(7, 1)
check(200, 50, resume_from=74)
