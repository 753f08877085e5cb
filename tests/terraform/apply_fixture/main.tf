# Applies the s3kv-bucket module against a local S3/IAM/STS emulator (moto's
# HTTP server) so that the module is exercised by a real provider, end to end.
# Used by tests/terraform/test_terraform.py, which copies this directory and
# terraform/modules/s3kv-bucket side by side into a temporary directory.
# Credentials are fake and come from the environment (AWS_ACCESS_KEY_ID=testing).

terraform {
  required_version = ">= 1.7.0"

  required_providers {
    aws = {
      source = "hashicorp/aws"
    }
  }
}

variable "endpoint" {
  description = "Base URL of the emulator, for example http://127.0.0.1:5000."
  type        = string
}

variable "bucket_name" {
  description = "Bucket to create."
  type        = string
}

provider "aws" {
  region                      = "us-east-1"
  s3_use_path_style           = true
  skip_credentials_validation = true
  skip_requesting_account_id  = true
  skip_metadata_api_check     = true
  skip_region_validation      = true
  # Fail fast instead of retrying an emulator error for minutes.
  max_retries = 1

  endpoints {
    s3  = var.endpoint
    iam = var.endpoint
    sts = var.endpoint
  }
}

module "s3kv" {
  source = "../../../terraform/modules/s3kv-bucket"

  bucket_name       = var.bucket_name
  prefix            = "s3kv"
  force_destroy     = true
  expire_after_days = 7

  roles = {
    engine = {
      trusted_principal_arns = ["arn:aws:iam::123456789012:root"]
    }
  }
}

output "bucket_name" {
  value = module.s3kv.bucket_name
}

output "bucket_arn" {
  value = module.s3kv.bucket_arn
}

output "engine_policy_arn" {
  value = module.s3kv.engine_policy_arn
}

output "engine_readonly_policy_arn" {
  value = module.s3kv.engine_readonly_policy_arn
}

output "gc_policy_arn" {
  value = module.s3kv.gc_policy_arn
}

output "engine_role_arn" {
  value = module.s3kv.engine_role_arn
}

output "kv_transfer_config" {
  value = module.s3kv.kv_transfer_config
}
