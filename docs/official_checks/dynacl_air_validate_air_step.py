# Run OUTSIDE the package, against the official code (docs/methods_dynacl_air.md, "Validation").
# OFFICIAL_ROOT (default /tmp/e) must hold air/ (GodXuxilie/Enhancing_ACL_via_AIR @15cf0a7, `git archive`),
# stubs/ (autoattack, robustbench.data, utils: see dynacl_air_validate_air.py) and an empty run/.
"""One real pretraining.train() iteration (real dual-BN resnet18 + proj head, real LARS, real PGD_contrastive and
AIR_Loss, float64 on the CPU, attack start injected through torch.rand_like) against tests/official_air_step.py."""
import builtins, copy, importlib.util, os, sys, types
import torch
ROOT = os.environ.get('OFFICIAL_ROOT', '/tmp/e')
torch.set_default_dtype(torch.float64)
torch.Tensor.cuda = lambda self, *a, **k: self
sys.path.insert(0, ROOT + '/stubs'); sys.path.insert(0, ROOT + '/air'); os.chdir(ROOT + '/run')
sys.argv = ['pretraining.py', 'air_step', '--ACL_DS']
import pretraining as mod
mod.args = mod.parser.parse_args()
from models.resnet_multi_bn import resnet18, proj_head
here = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location('oas', os.path.join(here, '..', '..', 'tests', 'official_air_step.py'))
oas = importlib.util.module_from_spec(spec); spec.loader.exec_module(oas)

torch.manual_seed(0)
bn = ['normal', 'pgd']
model = resnet18(pretrained=False, bn_names=bn)
model.fc = proj_head(512, bn_names=bn)
B = 4
x = torch.rand(B, 2, 3, 32, 32)
x_orig = torch.rand(B, 3, 32, 32)
delta0 = (torch.rand(2 * B, 3, 32, 32) * 2 - 1) * 8 / 255

for dyn, strength in ((False, 1.0), (True, 0.95), (True, 0.05)):
    mod.args.DynAug = dyn
    m = copy.deepcopy(model)
    real_rand_like = torch.rand_like
    torch.rand_like = lambda t, *a, **k: (delta0 + 8 / 255) / (2 * 8 / 255)
    rec = {'loss': []}
    class Opt(mod.LARS):
        def step(self, *a, **k):
            rec['grads'] = [p.grad.clone() for p in m.parameters()]
            return super().step(*a, **k)
    opt = Opt(m.parameters(), lr=5.0, weight_decay=1e-6)
    class Meter:
        def __init__(self): self.val = self.avg = 0.0
        def reset(self): pass
        def update(self, v, n=None): rec['loss'].append(v)
    mod.AverageMeter = Meter
    real_print = builtins.print; builtins.print = lambda *a, **k: None
    try:
        mod.train([(x, x_orig)], m, opt, types.SimpleNamespace(step=lambda: None), 1, mod.logger(path='.'), strength, 2 / 3)
    finally:
        builtins.print = real_print; torch.rand_like = real_rand_like

    mm = copy.deepcopy(model)
    loss, _ = oas.official_air_step(mm, x.view(2 * B, 3, 32, 32), x_orig, delta0, strength, dyn)
    grads = torch.autograd.grad(loss, list(mm.parameters()))
    dl = abs(loss.item() - rec['loss'][0])
    dg = max((a - b).abs().max().item() for a, b in zip(grads, rec['grads']))
    dbuf = max((a - b).abs().max().item() for a, b in zip(mm.buffers(), m.buffers()) if a.is_floating_point())
    print(f'AIR step DynAug={dyn} strength={strength}: loss {loss.item():.12f} |d loss| {dl:.1e}, '
          f'max |d grad| {dg:.1e}, max |d BN buffers| {dbuf:.1e}')
