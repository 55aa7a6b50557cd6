"""Knowledge samples: the schema, readers/writers, the synthetic demo set and dataset converters."""

from kcache.data.samples import (
    SampleError,
    read_samples,
    sample_set_fingerprint,
    samples_from_records,
    to_dataset,
    write_samples,
)

__all__ = [
    "SampleError",
    "read_samples",
    "write_samples",
    "samples_from_records",
    "to_dataset",
    "sample_set_fingerprint",
]
