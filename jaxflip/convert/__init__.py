"""Checkpoint conversion between HF transformers, torchtitan and the jaxflip (Orbax) checkpoint.

    python -m jaxflip.convert hf-to-orbax    SRC DST   # HF folder or hub id -> jaxflip
    python -m jaxflip.convert orbax-to-hf    SRC DST   # jaxflip -> HF folder (--merge-lora)
    python -m jaxflip.convert titan-to-orbax SRC DST   # torchtitan DCP folder / torch.save file -> jaxflip
    python -m jaxflip.convert orbax-to-titan SRC DST   # jaxflip -> torchtitan DCP folder

Every conversion streams tensor by tensor and writes DST aside, renaming it into place at
the end. ``hf_orbax`` and ``titan_orbax`` hold the conversions, built on the readers and
writers of each format in ``jaxflip.models`` (``hf_io``, ``titan_io``, ``orbax_io``); opening a
model for eval or training is ``jaxflip.models.open_checkpoint``, not this package.
"""
