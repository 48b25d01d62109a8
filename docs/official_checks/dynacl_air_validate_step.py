# Run OUTSIDE the package, against the official code (docs/methods_dynacl_air.md, "Validation").
# OFFICIAL_ROOT (default /tmp/e) must hold dynacl/ (PKU-ML/DYNACL @7d143db, `git archive`) and an empty run/.
"""One real train_DynACL.train() iteration (real resnet18_momentum + proj heads, real LARS, real PGD_contrastive,
float64 on the CPU, attack start injected through torch.rand_like) against tests/official_dynacl_step.py."""
import copy, importlib.util, os, sys, types
import torch
ROOT = os.environ.get('OFFICIAL_ROOT', '/tmp/e')
torch.set_default_dtype(torch.float64)  # the official swap output is torch.zeros(bsz, 512): default dtype
torch.Tensor.cuda = lambda self, *a, **k: self
sys.path.insert(0, ROOT + '/dynacl'); os.chdir(ROOT + '/run')
sys.argv = ['train_DynACL.py', '--experiment', 'step']
import train_DynACL as mod
from models.resnet_multi_bn import resnet18_momentum, proj_head
here = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location('ods', os.path.join(here, '..', '..', 'tests', 'official_dynacl_step.py'))
ods = importlib.util.module_from_spec(spec); spec.loader.exec_module(ods)

torch.manual_seed(0)
bn = ['normal', 'pgd']
model = resnet18_momentum(pretrained=False, bn_names=bn)
model.encoder_q.fc = proj_head(512, bn_names=bn); model.encoder_k.fc = proj_head(512, bn_names=bn)
model._init_encoder_k()
with torch.no_grad():  # make k differ from q (as after some training), so the EMA and the swap matter
    for p in model.encoder_k.parameters():
        p.add_(0.01 * torch.randn_like(p))
B = 4
x = torch.rand(B, 2, 3, 32, 32)
delta0 = (torch.rand(2 * B, 3, 32, 32) * 2 - 1) * 8 / 255
q_ref, k_ref = copy.deepcopy(model.encoder_q), copy.deepcopy(model.encoder_k)

for epoch, epochs, K in ((1, 1000, 50), (50, 1000, 50), (7, 10, 2)):
    m = copy.deepcopy(model)
    mod.args.epochs, mod.args.reload_frequency, mod.args.pgd_iter = epochs, K, 5
    real_rand_like = torch.rand_like
    torch.rand_like = lambda t, *a, **k: (delta0 + 8 / 255) / (2 * 8 / 255)  # rand_like * 2 eps - eps == delta0
    rec = {}
    class Opt(mod.LARS):
        def step(self, *a, **k):
            rec['grads'] = [p.grad.clone() if p.grad is not None else None for p in m.encoder_q.parameters()]
            return super().step(*a, **k)
    opt = Opt(m.parameters(), lr=5.0, weight_decay=1e-6)
    class Meter:
        def __init__(self): self.val = self.avg = 0.0
        def reset(self): pass
        def update(self, v, n=None):
            if n is not None: rec['loss'] = v
    mod.AverageMeter = Meter
    mod.train([x], m, opt, types.SimpleNamespace(step=lambda: None), epoch, mod.logger(path='.'), 10)
    torch.rand_like = real_rand_like

    q, k = copy.deepcopy(q_ref), copy.deepcopy(k_ref)
    xs = x.view(2 * B, 3, 32, 32)
    loss, _ = ods.official_dynacl_step(q, k, xs, delta0, epoch, epochs, K)
    grads = torch.autograd.grad(loss, [p for p in q.parameters()], allow_unused=True)
    dl = abs(loss.item() - rec['loss'])
    dg = max((a - b).abs().max().item() for a, b in zip(grads, rec['grads']) if a is not None)
    dk = max((a - b).abs().max().item() for a, b in zip(k.parameters(), m.encoder_k.parameters()))
    dbuf = max((a - b).abs().max().item() for a, b in zip(list(q.buffers()) + list(k.buffers()),
                                                         list(m.encoder_q.buffers()) + list(m.encoder_k.buffers()))
               if a.is_floating_point())
    print(f'DynACL step epoch {epoch}/{epochs} K={K}: loss {loss.item():.12f} |d loss| {dl:.1e}, max |d grad q| {dg:.1e}, '
          f'max |d k after EMA| {dk:.1e}, max |d BN buffers| {dbuf:.1e}')
