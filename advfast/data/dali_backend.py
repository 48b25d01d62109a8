"""NVIDIA DALI backend (optional extra ``advfast[dali]`` = nvidia-dali-cuda130).

One DALI pipeline per preset, fed the in-memory uint8 batch through ``external_source`` (as NHWC),
GPU operators when the images are on a GPU and DALI's CPU operators otherwise (so CI tests them), and
the float CHW views handed to torch through DLPack. DALI draws its own random parameters with its own
operators (random_resized_crop, random.coin_flip, random.uniform); the pipeline also returns the
flip / jitter / grayscale / blur parameters it drew, kept in ``last_params`` after each call so the
tests can compare distributions with the other backends (crop boxes are sampled inside
random_resized_crop and are measured from the outputs instead).

Determinism: the pipeline is seeded from the generator (``generator.initial_seed()``, no host sync) and
rebuilt whenever a different generator or seed comes in, so a fresh generator with the same seed
replays the same views. ``apply(images, params)`` is not available: DALI does not take crop windows.

Known differences from torchvision (the parameter distributions are the same; the op formulas are
DALI's): color_twist applies brightness, contrast, saturation and hue as one linear colour transform
(hue as a rotation in YIQ space, contrast around mid-grey rather than the image mean) in a fixed
order; grayscale is hsv saturation 0 (YIQ luma); a skipped blur is a blur with sigma 1e-3 (an identity).
"""

from __future__ import annotations

import torch

from advfast.data.augment_base import Augment
from advfast.data.sizes import blur_kernel_size, out_size
from advfast.data.presets import Blur, Flip, Grayscale, Jitter, Original, PadCrop, ResizedCrop

_INSTALL = "pip install nvidia-dali-cuda130 (or advfast[dali])"


def dali_error() -> str | None:
    """None when DALI is importable, else why not."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception as exc:  # ImportError, or a broken CUDA runtime
        return f"NVIDIA DALI is not importable ({type(exc).__name__}: {exc}); {_INSTALL}"
    return None


class DaliAugment(Augment):
    backend = "dali"

    def __init__(self, preset="simclr", size=None, num_threads: int = 2):
        reason = dali_error()
        if reason is not None:
            raise RuntimeError(f"augmentation backend 'dali' is not available: {reason}")
        super().__init__(preset, size)
        self.num_threads = num_threads
        self._pipe = None
        self._key = None
        self._generator = None
        self.last_params: list[dict] | None = None

    # -- pipeline ----------------------------------------------------------------------------------

    def _build(self, batch, shape, device, seed):
        from nvidia.dali import fn, pipeline_def, types

        h, w = int(shape[-2]), int(shape[-1])
        out = out_size(self.size, shape)
        on_gpu = device.type == "cuda"
        dev = "gpu" if on_gpu else "cpu"
        views = self.views

        def view_graph(images, view):
            x, outs = images, []
            for op in view:
                if isinstance(op, ResizedCrop):
                    interp = types.INTERP_CUBIC if op.interpolation == "bicubic" else types.INTERP_LINEAR
                    x = fn.random_resized_crop(x, size=list(out), random_area=list(op.scale),
                                               random_aspect_ratio=list(op.ratio), num_attempts=10,
                                               interp_type=interp, antialias=True)
                elif isinstance(op, PadCrop):
                    p = op.padding
                    top = fn.random.uniform(values=[float(v) for v in range(-p, h + p - out[0] + 1)])
                    left = fn.random.uniform(values=[float(v) for v in range(-p, w + p - out[1] + 1)])
                    x = fn.slice(x, start=fn.cast(fn.stack(top, left), dtype=types.INT32), shape=list(out), axis_names="HW",
                                 out_of_bounds_policy="pad", fill_values=0)
                    outs.append(("offset", fn.stack(top + p, left + p)))
                elif isinstance(op, Original):
                    if (h, w) != tuple(out):
                        x = fn.resize(x, size=list(out), interp_type=types.INTERP_LINEAR, antialias=True)
                elif isinstance(op, Flip):
                    coin = fn.random.coin_flip(probability=op.p)
                    x = fn.flip(x, horizontal=coin)
                    outs.append(("flip", coin))
                elif isinstance(op, Jitter):
                    on = fn.cast(fn.random.coin_flip(probability=op.p), dtype=types.FLOAT)
                    b = fn.random.uniform(range=[1 - op.brightness, 1 + op.brightness])
                    c = fn.random.uniform(range=[1 - op.contrast, 1 + op.contrast])
                    s = fn.random.uniform(range=[1 - op.saturation, 1 + op.saturation])
                    hue = fn.random.uniform(range=[-op.hue, op.hue])
                    b, c, s, hue = (1 + on * (b - 1)), (1 + on * (c - 1)), (1 + on * (s - 1)), on * hue
                    x = fn.color_twist(x, brightness=b, contrast=c, saturation=s, hue=hue * 360.0)
                    outs += [("jitter", on), ("factors", fn.stack(b, c, s, hue))]
                elif isinstance(op, Grayscale):
                    coin = fn.random.coin_flip(probability=op.p)
                    x = fn.hsv(x, saturation=1.0 - fn.cast(coin, dtype=types.FLOAT))
                    outs.append(("gray", coin))
                elif isinstance(op, Blur):
                    on = fn.cast(fn.random.coin_flip(probability=op.p), dtype=types.FLOAT)
                    sigma = fn.random.uniform(range=list(op.sigma))
                    k = blur_kernel_size(op.sigma[1], out)
                    x = fn.gaussian_blur(x, sigma=on * sigma + (1 - on) * 1e-3, window_size=k)
                    outs += [("blur", on), ("sigma", on * sigma)]
            x = fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="CHW", mean=[0.0], std=[255.0])
            return x, outs

        names = []

        @pipeline_def(batch_size=batch, num_threads=self.num_threads, device_id=(device.index or 0) if on_gpu else None,
                      seed=seed, prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
        def pipe():
            images = fn.external_source(name="images", device=dev, layout="HWC", dtype=types.UINT8)
            results = []
            for v, view in enumerate(views):
                x, outs = view_graph(images, view)
                results.append(x)
                for key, node in outs:
                    names.append((v, key))
                    results.append(node)
            return tuple(results)

        p = pipe()
        p.build()
        return p, names

    def _pipeline(self, batch, shape, device, generator):
        seed = int(generator.initial_seed() % (2**31)) if generator is not None else 0
        key = (seed, tuple(shape[1:]), device, self.views)  # the views are baked into the pipeline graph
        # the last generator is held, so a new one can never reuse its id and be mistaken for it
        if (self._pipe is None or generator is not self._generator or self._key != key
                or self._pipe[0].max_batch_size < batch):
            self._pipe = self._build(batch, shape, device, seed)
            self._key, self._generator = key, generator
        return self._pipe

    def _views_changed(self) -> None:
        self._pipe = None  # built for the old views (the key would also tell; this frees it now)

    # -- calls -------------------------------------------------------------------------------------

    def __call__(self, images, generator=None):
        self.check_images(images)
        pipe, names = self._pipeline(images.shape[0], images.shape, images.device, generator)
        nhwc = images.permute(0, 2, 3, 1).contiguous()
        if images.is_cuda:
            pipe.feed_input("images", nhwc, cuda_stream=torch.cuda.current_stream(images.device).cuda_stream)
        else:
            pipe.feed_input("images", nhwc.numpy())
        outputs = list(pipe.run())
        views, params, k = [], [{} for _ in self.views], 0
        for v in range(self.num_views):
            views.append(_to_torch(outputs[k], images.device))
            k += 1
            for _, key in [n for n in names if n[0] == v]:
                val = _to_torch(outputs[k], torch.device("cpu"))
                k += 1
                if key in ("flip", "jitter", "gray", "blur"):
                    val = val.reshape(-1) > 0.5
                elif key == "sigma":
                    val = val.reshape(-1)
                elif key == "offset":
                    val = val.reshape(-1, 2).round().long()
                params[v][key] = val
        self.last_params = params
        return views

    def sample_params(self, batch, image_shape, generator=None, device=None):
        """The parameters DALI draws for a batch (by running the pipeline on blank images)."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        blank = torch.zeros((batch,) + tuple(image_shape[-3:]), dtype=torch.uint8, device=device)
        self(blank, generator)
        return self.last_params

    def apply(self, images, params):
        raise NotImplementedError("the dali backend draws its own parameters (crop windows inside "
                                  "random_resized_crop); use the torch or torchvision backend to apply given ones")


def _to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    dense = tensor_list.as_tensor()
    if device.type == "cuda":
        # DALI reuses its output buffers on the next run: one device copy keeps the views valid
        return torch.from_dlpack(dense).clone()
    import numpy as np

    return torch.from_numpy(np.array(dense))
