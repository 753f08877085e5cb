# Inputs that the module must reject at plan time.

mock_provider "aws" {
  mock_data "aws_region" {
    defaults = {
      name = "us-east-1"
    }
  }

  mock_data "aws_caller_identity" {
    defaults = {
      account_id = "123456789012"
    }
  }
}

variables {
  bucket_name = "s3kv-validation"
}

run "rejects_unknown_bucket_type" {
  command = plan

  variables {
    bucket_type = "express_one_zone"
  }

  expect_failures = [var.bucket_type]
}

run "rejects_directory_bucket_without_az_id" {
  command = plan

  variables {
    bucket_type = "directory"
  }

  expect_failures = [aws_s3_directory_bucket.this]
}

run "rejects_too_long_directory_bucket_name" {
  command = plan

  variables {
    bucket_name          = "s3kv-a-very-long-base-name-for-a-directory-bucket-xyz"
    bucket_type          = "directory"
    availability_zone_id = "use1-az4"
  }

  expect_failures = [aws_s3_directory_bucket.this]
}

run "rejects_wildcard_prefix" {
  command = plan

  variables {
    prefix = "s3kv*"
  }

  expect_failures = [var.prefix]
}

run "rejects_prefix_with_slashes_at_the_ends" {
  command = plan

  variables {
    prefix = "/s3kv/"
  }

  expect_failures = [var.prefix]
}

run "rejects_zero_expiry" {
  command = plan

  variables {
    expire_after_days = 0
  }

  expect_failures = [var.expire_after_days]
}

run "rejects_role_without_trust" {
  command = plan

  variables {
    roles = {
      engine = {}
    }
  }

  expect_failures = [var.roles]
}

run "rejects_invalid_bucket_name" {
  command = plan

  variables {
    bucket_name = "S3KV_Cache"
  }

  expect_failures = [var.bucket_name]
}
