"""granet inside other people's training loops.

``granet.integrations.hf.GraNetCallback`` is a Hugging Face ``TrainerCallback`` (extra
``granet[hf]``), ``granet.integrations.lightning.GraNetCallback`` a Lightning ``Callback`` (extra
``granet[lightning]``). Both build the sparsifier when training begins, keep its state in the
framework's checkpoints and report its scalars to the framework's loggers; what they share is in
``granet.integrations.attach``. ``granet.integrations.peft`` (extra ``granet[peft]``) trains
and merges LoRA adapters on a sparse model without filling its zeros. Importing this package
imports none of the frameworks.
"""
