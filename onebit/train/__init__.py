"""The training application, and the only package that imports Lightning: the LightningModule
(:mod:`.module`), FSDP2 (:mod:`.parallel`), numerical guards, callbacks, checkpoint I/O, loggers,
run directories, the pre-flight checks of ``train.py`` and the memory planner."""
