"""Domain errors: the CLI turns each into a one-line message and a non-zero exit code."""


class GpumlpError(Exception):
    """An error the user can fix; its message says what is wrong and how to fix it."""


class ConfigError(GpumlpError):
    """A config file, key or value is wrong."""


class DataError(GpumlpError):
    """The MNIST files are missing, unreadable or not what they claim to be."""


class DeviceError(GpumlpError):
    """The requested device is not usable."""


class CheckpointError(GpumlpError):
    """A model or checkpoint file is missing, unsafe or inconsistent."""
