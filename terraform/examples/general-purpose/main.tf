# A general-purpose S3 bucket as the s3kv KV-cache tier, with IAM roles for
# the vLLM engine and the garbage collector.
#
#   terraform init
#   terraform apply -var bucket_name=my-org-s3kv-cache \
#     -var 'engine_trusted_principal_arns=["arn:aws:iam::123456789012:role/vllm-node"]'
#   vllm serve <model> --kv-transfer-config "$(terraform output -raw kv_transfer_config)"

provider "aws" {
  region = var.region
}

module "s3kv_cache" {
  source = "../../modules/s3kv-bucket"

  bucket_name       = var.bucket_name
  prefix            = "s3kv"
  expire_after_days = var.expire_after_days

  roles = {
    engine = length(var.engine_trusted_principal_arns) == 0 ? null : {
      trusted_principal_arns = var.engine_trusted_principal_arns
    }
    gc = length(var.gc_trusted_principal_arns) == 0 ? null : {
      trusted_principal_arns = var.gc_trusted_principal_arns
    }
  }

  tags = {
    application = "s3kv"
  }
}
