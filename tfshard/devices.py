"""`tfshard.cpu_devices(n)`: n devices for a `MirroredStrategy` on one machine."""

import tensorflow as tf


def cpu_devices(n):
    """Configures and returns `n` devices to use as `MirroredStrategy` replicas.

    Without GPUs, splits the host CPU into `n` logical CPU devices (they share
    the cores; each replica's slice lives on its own device). With at least
    `n` GPUs, returns the first `n` GPUs instead, so the same code uses them.

        strategy = tf.distribute.MirroredStrategy(tfshard.cpu_devices(4))

    Must run before TensorFlow initialises its devices, i.e. before the first
    tensor, model or strategy is created; calling it again with the same `n`
    is fine.

    Args:
        n: the number of devices (>= 1).

    Returns:
        A list of `n` device names, e.g. `["/device:CPU:0", "/device:CPU:1"]`.

    Raises:
        ValueError: `n` is not a positive int.
        RuntimeError: TensorFlow already initialised its devices with fewer
            than `n` logical CPUs; the message says where to call it instead.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"cpu_devices(n) needs a positive int; got {n!r}.")
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) >= n:
        return [d.name for d in tf.config.list_logical_devices("GPU")[:n]]
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
    except RuntimeError:
        pass  # already initialised: fine if it already has enough devices
    logical = [d.name for d in tf.config.list_logical_devices("CPU")]
    if len(logical) < n:
        raise RuntimeError(
            f"tfshard.cpu_devices({n}) came too late: TensorFlow has already initialised "
            f"{len(logical)} logical CPU device(s) {logical} in this process, and they cannot "
            "change afterwards. Call tfshard.cpu_devices(n) first thing, before creating any "
            "tensor, model or strategy (for example right after `import tfshard`)."
        )
    return logical[:n]
