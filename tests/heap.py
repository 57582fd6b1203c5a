"""A cheaper start and exit for the suite's processes: the collector paused while
TensorFlow imports, the import heap frozen, and everything frozen at exit.

Every launch starts two to four ranks, and each used to spend ~3.4 s importing
TensorFlow, Keras and keras-hub and ~0.85 s exiting (2-core AVX-512 EPYC); the
collector's passes over the import heap, while it is built and again at exit, were
~0.8 s of each. Paused, then frozen: 4.3 s per process became 2.5 s. Frozen objects are
never scanned again, which also makes Keras's `gc.collect()` per variable a layer drops
(every `model.quantize`) cheap.

    import heap
    heap.pause()
    import keras  # ... the process's imports
    heap.resume()
"""

import atexit
import gc

_resumed = []


def pause():
    """Pauses the collector for the imports that follow (until `resume`)."""
    gc.disable()


def resume():
    """Resumes the collector and freezes what exists now (the imports); at exit, freezes
    everything, so that the interpreter's last collection walks nothing. Idempotent."""
    gc.enable()
    gc.freeze()
    if not _resumed:
        atexit.register(gc.freeze)
        _resumed.append(True)
