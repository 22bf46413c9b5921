"""Episodes on disk in the LeRobot dataset layout v3.0: crash-safe writer, fast chunk-sampling reader.

    with DatasetWriter(root, default_spec()) as w:
        w.begin_episode()
        for frame in frames:                      # dict: feature name -> array
            w.add_frame(frame, task="put the red cube on the plate")
        w.end_episode(success=True, extra={"seed": 3})

    ds = Dataset(root, EpisodeFilter(success=True, limit=5))
    for batch in ChunkSampler(ds, batch_size=64, chunk=10):
        ...                                       # batch["action"]: (64, 10, 7), batch["action_is_pad"]

numpy/pyarrow/pillow only: the room knows nothing of sim, models or torch.
"""

from edge_steer.data.reader import ChunkSampler, Dataset, EpisodeFilter, EpisodeInfo
from edge_steer.data.schema import CODEBASE_VERSION, DatasetError, DatasetSpec, Feature, default_spec, validate_frame
from edge_steer.data.writer import DatasetWriter

__all__ = [
    "CODEBASE_VERSION", "ChunkSampler", "Dataset", "DatasetError", "DatasetSpec", "DatasetWriter",
    "EpisodeFilter", "EpisodeInfo", "Feature", "default_spec", "validate_frame",
]
