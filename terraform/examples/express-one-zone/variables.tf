variable "region" {
  description = "AWS region that holds the Availability Zone."
  type        = string
  default     = "us-east-1"
}

variable "bucket_base_name" {
  description = "Base name; the bucket is named <base>--<availability_zone_id>--x-s3."
  type        = string
}

variable "availability_zone_id" {
  description = "AZ ID of the directory bucket, for example use1-az4 (same zone as the GPU nodes)."
  type        = string
  default     = "use1-az4"
}

variable "expire_after_days" {
  description = "Expire cached KV blocks after this many days (null: never)."
  type        = number
  default     = 3
}

variable "engine_trusted_principal_arns" {
  description = "IAM principals allowed to assume the engine role (none: no role is created)."
  type        = list(string)
  default     = []
}
