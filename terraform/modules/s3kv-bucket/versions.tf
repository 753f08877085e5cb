terraform {
  # 1.7 is the first release with `mock_provider` in `terraform test`.
  required_version = ">= 1.7.0"

  required_providers {
    aws = {
      source = "hashicorp/aws"
      # 5.86 reworked aws_s3_bucket_lifecycle_configuration, which this module
      # also applies to directory buckets.
      version = ">= 5.86.0, < 6.0.0"
    }
  }
}
