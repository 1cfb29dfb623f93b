"""The IndexCache operator: reconciles IndexCacheDeployment resources into KubeRay RayServices,
recalibration Jobs and CronJobs. Imports neither torch nor ray (the operator image is light)."""

GROUP = "indexcache.io"
VERSION = "v1alpha1"
KIND = "IndexCacheDeployment"
PLURAL = "indexcachedeployments"
SINGULAR = "indexcachedeployment"
SHORT_NAMES = ["icd"]
API_VERSION = f"{GROUP}/{VERSION}"

# Annotation users set (to any new token) to ask for a recalibration now.
RECALIBRATE_ANNOTATION = f"{GROUP}/recalibrate"
# Labels on every child object: how the operator finds the owner of an event.
DEPLOYMENT_LABEL = f"{GROUP}/deployment"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "indexcache-operator"
COMPONENT_LABEL = "app.kubernetes.io/component"
