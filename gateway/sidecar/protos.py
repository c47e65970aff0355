"""The one module that imports the Dapr SDK's generated protocol classes.

The workflow classes live under a private path of the dapr 1.19 wheel, which is why the
dependency is pinned to that minor version. Everything else in the sidecar imports from here.
"""

from dapr.ext.workflow._durabletask.internal import orchestrator_service_pb2_grpc as workflow_grpc
from dapr.ext.workflow._durabletask.internal import protos as pb
from dapr.proto.common.v1 import common_pb2 as common_pb
from dapr.proto.runtime.v1 import dapr_pb2_grpc as runtime_grpc
from dapr.proto.runtime.v1 import metadata_pb2 as metadata_pb
from dapr.proto.runtime.v1 import state_pb2 as state_pb

__all__ = ["common_pb", "metadata_pb", "pb", "runtime_grpc", "state_pb", "workflow_grpc"]
