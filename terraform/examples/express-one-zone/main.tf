# An S3 Express One Zone directory bucket as the s3kv KV-cache tier. Put the
# bucket in the Availability Zone of the GPU nodes: cross-AZ traffic adds
# latency and transfer cost. Use the AZ *ID* (aws ec2 describe-availability-zones
# shows ZoneId), which names the same physical zone in every account.
#
#   terraform init
#   terraform apply -var bucket_base_name=my-org-s3kv -var availability_zone_id=use1-az4
#   vllm serve <model> --kv-transfer-config "$(terraform output -raw kv_transfer_config)"

provider "aws" {
  region = var.region
}

module "s3kv_cache" {
  source = "../../modules/s3kv-bucket"

  bucket_type          = "directory"
  bucket_name          = var.bucket_base_name
  availability_zone_id = var.availability_zone_id
  prefix               = "s3kv"
  expire_after_days    = var.expire_after_days

  roles = {
    engine = length(var.engine_trusted_principal_arns) == 0 ? null : {
      trusted_principal_arns = var.engine_trusted_principal_arns
    }
  }

  tags = {
    application = "s3kv"
  }
}
